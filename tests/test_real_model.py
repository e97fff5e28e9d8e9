"""The bundled SmolLM2-135M-Instruct end to end, checked against implementations no one here
wrote: Hugging Face transformers on the same dequantized weights, and llama.cpp on the same GGUF."""

import os

import pytest
import torch

from lutlm.generate import Generator, SamplingParams
from lutlm.perplexity import model_perplexity, read_text, score_chunks

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "<|im_start|>user\nWhat are the three primary colors?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes",
]

# Mean KL(llama.cpp || lutlm) per position. lutlm multiplies the dequantized Q4_1 weights
# by float32 activations; llama.cpp quantizes activations to 8 bits (Q8_1) for its dot
# products, which perturbs logits by a few hundredths: measured ~1e-3 nats, bound with margin.
MAX_MEAN_KL = 0.01


def logits_of(model, tokens: list[int]) -> torch.Tensor:
    model.setup_cache(1, 512)
    with torch.inference_mode():
        return model(torch.tensor([tokens]), 0)[0]


def test_matches_transformers_on_same_weights(bundled):
    transformers = pytest.importorskip("transformers")
    model, tokenizer, checkpoint = bundled
    c = checkpoint.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(checkpoint.tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    for prompt in PROMPTS[:3]:
        tokens = tokenizer.encode(prompt)
        with torch.inference_mode():
            expected = hf(torch.tensor([tokens])).logits[0]
        # Same fp32 weights; only summation order differs over 30 layers.
        torch.testing.assert_close(logits_of(model, tokens), expected, rtol=1e-3, atol=2e-3)


def test_greedy_chat_answer_is_coherent(bundled):
    model, tokenizer, _ = bundled
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    answer = Generator(model, tokenizer, 256).complete(tokenizer.encode(prompt), SamplingParams(max_new_tokens=24))
    assert "Paris" in answer


def test_tokenizer_matches_transformers_gguf_conversion(bundled, bundled_path, wikitext_path):
    transformers = pytest.importorskip("transformers")
    _, tokenizer, _ = bundled
    reference = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(bundled_path), gguf_file=os.path.basename(bundled_path)
    )
    text = read_text(wikitext_path)[:20000]
    for sample in [text, *PROMPTS, "Numbers 12345 and 3.14159, emoji 🙂, accents café"]:
        assert tokenizer.encode(sample) == reference.encode(sample, add_special_tokens=False)


def test_tokenizer_matches_llama_cpp(bundled, llama_cpp_model, wikitext_path):
    _, tokenizer, _ = bundled
    text = read_text(wikitext_path)[:20000]
    for sample in [text, *PROMPTS]:
        assert tokenizer.encode(sample) == llama_cpp_model.tokenize(sample)


def test_logits_agree_with_llama_cpp(bundled, llama_cpp_model):
    model, tokenizer, _ = bundled
    agree = total = 0
    kls = []
    for prompt in PROMPTS:
        tokens = tokenizer.encode(prompt)
        ours = torch.log_softmax(logits_of(model, tokens), -1)
        theirs = torch.log_softmax(llama_cpp_model.logits(tokens), -1)
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(tokens)
        kls.append((theirs.exp() * (theirs - ours)).sum(-1))
    mean_kl = torch.cat(kls).mean().item()
    print(f"top-1 agreement {agree}/{total} = {agree / total:.4f}, mean KL {mean_kl:.2e}")
    assert agree / total >= 0.98
    assert mean_kl < MAX_MEAN_KL


def test_perplexity_agrees_with_llama_cpp(bundled, llama_cpp_model, wikitext_path):
    model, tokenizer, _ = bundled
    text = read_text(wikitext_path)
    ours = model_perplexity(model, tokenizer, text, ctx=512, max_chunks=4, progress=False)
    tokens = tokenizer.encode(text)
    theirs = score_chunks(llama_cpp_model.logits, tokens, ctx=512, max_chunks=4, progress=False)
    assert ours.tokens_scored == theirs.tokens_scored == 4 * 255
    assert abs(ours.perplexity / theirs.perplexity - 1) < 0.01


def test_perplexity_is_sane_on_wikitext(bundled, wikitext_path):
    model, tokenizer, _ = bundled
    result = model_perplexity(model, tokenizer, read_text(wikitext_path), ctx=512, max_chunks=2, progress=False)
    assert result.tokens_scored == 2 * 255
    # A 135M model on WikiText-2 lands around 20; a broken model is in the hundreds or thousands.
    assert 5 < result.perplexity < 40
