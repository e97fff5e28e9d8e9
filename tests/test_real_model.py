"""The bundled SmolLM2-135M-Instruct end to end, checked against implementations no one here
wrote: Hugging Face transformers on the same dequantized weights, and llama.cpp on the same GGUF."""

import os

import pytest
import torch

from conftest import open_llama_cpp
from lutlm.generate import Generator, SamplingParams
from lutlm.perplexity import model_perplexity, read_text, score_chunks
from lutlm.tokenizer import ChatPrompt

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "<|im_start|>user\nWhat are the three primary colors?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes",
]

# On the Q4_1 file llama.cpp and lutlm disagree at about 4% of positions (top-1, near-ties),
# mean KL(llama.cpp || lutlm) about 3.4e-3 nats. llama.cpp disagrees with ITSELF as much: its
# logits on the Q4_1 file against its logits on the same weights dequantized to an F32 GGUF
# flip the same share of top-1 tokens with the same KL (test_quantized_gap_is_llama_cpps_own),
# while on the F32 file lutlm and llama.cpp agree to 7e-7 nats. So the gap is in llama.cpp's
# quantized arithmetic, not in lutlm's model. (Emulating llama.cpp's Q8 activation rounding in
# lutlm did not close it, so its exact source inside llama.cpp is not pinned down.)
QUANTIZED_GGUF_BOUNDS = {"top1": 0.95, "kl": 0.01}
F32_GGUF_BOUNDS = {"top1": 0.99, "kl": 1e-5}


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
        # as template text (special tokens matched), which is how both references read a string
        assert tokenizer.encode(ChatPrompt([(sample, True)])) == reference.encode(sample, add_special_tokens=False)
        assert tokenizer.encode(sample) == reference.encode(sample, add_special_tokens=False, split_special_tokens=True)


def test_tokenizer_matches_llama_cpp(bundled, llama_cpp_model, wikitext_path):
    _, tokenizer, _ = bundled
    text = read_text(wikitext_path)[:20000]
    for sample in [text, *PROMPTS]:
        assert tokenizer.encode(ChatPrompt([(sample, True)])) == llama_cpp_model.tokenize(sample)


@pytest.fixture(scope="module")
def f32_gguf(bundled, tmp_path_factory):
    """The bundled model's dequantized weights written back as an F32 GGUF."""
    from lutlm.formats.gguf_writer import save_gguf

    path = tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf"
    save_gguf(bundled[2], path, "F32")
    return str(path)


def test_f32_gguf_round_trips(bundled, f32_gguf):
    from lutlm.formats.gguf import load_gguf

    original, again = bundled[2], load_gguf(f32_gguf)
    assert again.config == original.config
    assert again.tensors.keys() == original.tensors.keys()
    for name, tensor in original.tensors.items():
        assert torch.equal(again.tensors[name], tensor), name


def agreement(ours, theirs, tokenizer, wikitext_path) -> tuple[float, float]:
    """Top-1 agreement and mean KL(theirs || ours) over prompts and WikiText passages; `ours` and
    `theirs` map a token list to its logits."""
    wiki = tokenizer.encode(read_text(wikitext_path)[:40000])
    sequences = [tokenizer.encode(p) for p in PROMPTS] + [wiki[i:i + 256] for i in range(0, 1024, 256)]
    agree = total = 0
    kls = []
    for tokens in sequences:
        a = torch.log_softmax(ours(tokens), -1)
        b = torch.log_softmax(theirs(tokens), -1)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(tokens)
        kls.append((b.exp() * (b - a)).sum(-1))
    return agree / total, torch.cat(kls).mean().item()


@pytest.fixture(scope="module")
def llama_cpp_f32(f32_gguf):
    """llama.cpp on the bundled model's weights as an F32 GGUF."""
    return open_llama_cpp(f32_gguf)


def lutlm_logits(bundled):
    return lambda tokens: logits_of(bundled[0], tokens)


@pytest.fixture(scope="module")
def q4_1_agreement(bundled, llama_cpp_model, wikitext_path) -> tuple[float, float]:
    """lutlm against llama.cpp on the bundled Q4_1 GGUF, measured once for the tests below."""
    return agreement(lutlm_logits(bundled), llama_cpp_model.logits, bundled[1], wikitext_path)


def test_logits_agree_with_llama_cpp_on_same_gguf(q4_1_agreement):
    top1, kl = q4_1_agreement
    print(f"Q4_1 GGUF: top-1 agreement {top1:.4f}, mean KL {kl:.2e}")
    assert top1 >= QUANTIZED_GGUF_BOUNDS["top1"] and kl < QUANTIZED_GGUF_BOUNDS["kl"]


def test_logits_agree_with_llama_cpp_on_f32_weights(bundled, llama_cpp_f32, wikitext_path):
    top1, kl = agreement(lutlm_logits(bundled), llama_cpp_f32.logits, bundled[1], wikitext_path)
    print(f"F32 GGUF: top-1 agreement {top1:.4f}, mean KL {kl:.2e}")
    assert top1 >= F32_GGUF_BOUNDS["top1"] and kl < F32_GGUF_BOUNDS["kl"]


def test_quantized_gap_is_llama_cpps_own(bundled, q4_1_agreement, llama_cpp_model, llama_cpp_f32, wikitext_path):
    """llama.cpp on the Q4_1 file is no closer to llama.cpp on the same weights in F32 than to lutlm."""
    ours = q4_1_agreement
    its_own = agreement(llama_cpp_f32.logits, llama_cpp_model.logits, bundled[1], wikitext_path)
    print(f"Q4_1 GGUF against lutlm: top-1 {ours[0]:.4f}, KL {ours[1]:.2e}; "
          f"against llama.cpp on F32 weights: top-1 {its_own[0]:.4f}, KL {its_own[1]:.2e}")
    assert ours[0] >= its_own[0] - 0.005 and ours[1] <= 1.05 * its_own[1]


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
