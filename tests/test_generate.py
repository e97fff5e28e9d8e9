"""Sampling rules, stop conditions, streaming and prompt-prefix reuse."""

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from lutlm.config import ModelConfig
from lutlm.formats import TokenizerSpec
from lutlm.generate import Generator, SamplingParams, sample_next
from lutlm.tokenizer import Tokenizer

EOS = 256


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: token i is byte i, 256 is the end token."""
    # GPT-2's byte-to-character map: printable bytes stand for themselves, the rest from U+0100 on.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    vocab = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    tok = HFTokenizer(models.BPE(vocab=dict(vocab), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    spec = TokenizerSpec(tokenizer_json=tok.to_str(), eos_token_id=tok.token_to_id("<eos>"))
    return Tokenizer(spec)


class ScriptedModel:
    """Stands in for a Transformer: emits a fixed token sequence and records what it was fed."""

    def __init__(self, script: list[int], vocab: int = 257):
        self.config = ModelConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=512)
        self.script = script
        self.calls: list[tuple[list[int], int]] = []
        self.vocab = vocab

    def __call__(self, tokens, start_pos, last_logits_only=False, cache=None):
        self.calls.append((tokens[0].tolist(), start_pos))
        produced = sum(1 for _, pos in self.calls) - 1
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, 0, self.script[min(produced, len(self.script) - 1)]] = 10.0
        return logits


def test_byte_tokenizer_is_identity_on_bytes():
    tok = byte_tokenizer()
    assert tok.encode("héllo") == list("héllo".encode())
    assert tok.eos_id == EOS


def test_greedy_is_argmax_and_topk_limits_support():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_next(logits.clone(), SamplingParams(), [], None) == 1
    rng = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_k=2)
    picks = {sample_next(logits.clone(), params, [], rng) for _ in range(200)}
    assert picks == {1, 3}


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rng = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=0.7)
    picks = {sample_next(logits.clone(), params, [], rng) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 alone is below 0.7; 0.5 + 0.3 reaches it


def test_repetition_penalty_demotes_seen_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0])
    assert sample_next(logits.clone(), SamplingParams(repetition_penalty=1.2), [0], None) == 1


def test_bad_sampling_parameters_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-1)


def test_stops_at_end_token_and_counts():
    tok = byte_tokenizer()
    model = ScriptedModel([ord("h"), ord("i"), EOS])
    gen = Generator(model, tok, context_length=64)
    assert gen.complete(tok.encode("x"), SamplingParams(max_new_tokens=10)) == "hi"
    assert gen.stats.finish_reason == "stop"
    assert gen.stats.generated_tokens == 3


def test_stop_string_is_cut_and_never_streamed():
    tok = byte_tokenizer()
    text = "abc<END>zzz"
    model = ScriptedModel([ord(c) for c in text])
    gen = Generator(model, tok, context_length=64)
    pieces = list(gen.stream_text(tok.encode("x"), SamplingParams(max_new_tokens=20, stop=["<END>"])))
    assert "".join(pieces) == "abc"
    assert all("<" not in p for p in pieces)
    assert gen.stats.finish_reason == "stop"


def test_multibyte_characters_stream_whole():
    tok = byte_tokenizer()
    model = ScriptedModel(list("é!".encode()) + [EOS])
    gen = Generator(model, tok, context_length=64)
    pieces = list(gen.stream_text(tok.encode("x"), SamplingParams(max_new_tokens=10)))
    assert pieces == ["é", "!"]


def test_length_limit_and_context_check():
    tok = byte_tokenizer()
    gen = Generator(ScriptedModel([ord("a")]), tok, context_length=16)
    assert gen.complete(tok.encode("x"), SamplingParams(max_new_tokens=5)) == "aaaaa"
    assert gen.stats.finish_reason == "length"
    with pytest.raises(ValueError, match="exceeds the context length 16"):
        gen.complete(tok.encode("x" * 10), SamplingParams(max_new_tokens=10))


def test_next_prompt_reuses_cached_prefix():
    tok = byte_tokenizer()
    model = ScriptedModel([ord("a"), EOS])
    gen = Generator(model, tok, context_length=64)
    first = tok.encode("hello")
    gen.complete(first, SamplingParams(max_new_tokens=4))
    model.calls.clear()
    gen.complete(first + [ord("a"), ord("!")], SamplingParams(max_new_tokens=1))
    # The cache already holds "hello" and the generated "a": only "!" is new.
    fed, start = model.calls[0]
    assert (fed, start) == ([ord("!")], len(first) + 1)
    assert gen.stats.prefilled_tokens == 1
    # Another generator on the same model has a cache of its own: it starts from nothing.
    other = Generator(model, tok, context_length=64)
    model.calls.clear()
    other.complete(first, SamplingParams(max_new_tokens=1))
    assert model.calls[0] == (first, 0)
    assert other.stats.prefilled_tokens == len(first)
    assert other.cache is not gen.cache


def test_chat_template_renders_with_jinja_sandbox():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == "<|user|>hi\n<|assistant|>"
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
