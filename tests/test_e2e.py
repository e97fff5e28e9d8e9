"""`lutlm bench e2e` on tiny models: synthetic checkpoints, the timing harness, the report,
and (where llama-cpp-python is installed) a synthetic GGUF that llama.cpp quantizes and runs."""

import argparse
import json

import pytest
import torch

from lutlm import peer
from lutlm.bench import e2e, synthetic
from lutlm.config import ModelConfig
from lutlm.formats import TokenizerSpec
from lutlm.kernels import cpu
from lutlm.loader import build_model

TINY = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, name="tiny")


def tiny_vocabulary(n: int = 100) -> TokenizerSpec:
    return TokenizerSpec(gguf_model="gpt2", tokens=[f"t{i}" for i in range(n)], token_types=[1] * n,
                         bos_token_id=0, eos_token_id=1)


def test_synthetic_shapes_and_scale():
    config = synthetic.synthetic_config("llama3-8b", 2)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 4096, 14336)
    shapes = synthetic.tensor_shapes(config)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (1024, 4096)  # 8 KV heads of 128
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (4096, 14336)
    assert len(shapes) == 2 * 9 + 3
    w = synthetic.random_tensor("model.layers.0.mlp.down_proj.weight", (256, 1024))
    assert abs(float(w.std()) - 0.5 / 1024 ** 0.5) < 0.02 * 0.5 / 1024 ** 0.5  # 262k samples: std within 2%
    assert torch.equal(w, synthetic.random_tensor("model.layers.0.mlp.down_proj.weight", (256, 1024)))
    assert not torch.equal(w, synthetic.random_tensor("model.layers.1.mlp.down_proj.weight", (256, 1024)))
    assert torch.equal(synthetic.random_tensor("model.norm.weight", (8,)), torch.ones(8))


def test_synthetic_config_refuses_bad_requests():
    with pytest.raises(ValueError, match="unknown synthetic model shape 'llama-70b'; choose one of llama2-7b"):
        synthetic.synthetic_config("llama-70b", 2)
    with pytest.raises(ValueError, match="llama2-7b has 1 to 32 layers, not 33"):
        synthetic.synthetic_config("llama2-7b", 33)
    with pytest.raises(ValueError, match="the vocabulary has 5 tokens, the model 100"):
        synthetic.random_checkpoint(TINY, tiny_vocabulary(5))


@pytest.fixture(scope="module")
def tiny_variants():
    """The tiny model packed as the benchmark packs its models, on the reference backend and,
    where built, on the CPU kernels (which decode through FastDecoder)."""
    checkpoint = synthetic.random_checkpoint(TINY, tiny_vocabulary())
    variants = []
    for kind, recipe in e2e.lutlm_recipes(32).items():
        packed = e2e.pack_with_head(checkpoint, recipe, 32)
        for backend in ["reference"] + (["cpu"] if cpu.available() else []):
            runner = e2e.LutlmRunner(build_model(packed, backend), context=32)
            bits = e2e.layer_bits(packed.packed)
            variants.append(e2e.Variant("lutlm", f"{kind} {backend}", bits, "4-bit g32", runner))
    return variants


def test_packing_recipes_keep_a_4bit_head(tiny_variants):
    bits = {v.kind: v.bits_per_weight for v in tiny_variants}
    assert bits["2-bit reference"] == 2 + 32 / 32  # fp16 scale and zero per group of 32
    assert bits["4-bit reference"] == 4 + 32 / 32
    # Ternary: one fp16 scale per row, 16 / K bits; K = 64 for 28672 of the 36864 weights, 128 for down_proj.
    assert bits["ternary reference"] == pytest.approx(2 + 16 * (28672 / 64 + 8192 / 128) / 36864)
    head = tiny_variants[0].runner.model.lm_head
    assert (head.bits, head.group_size) == (e2e.HEAD_BITS, 32)


def test_harness_times_every_variant_and_reports(tiny_variants, tmp_path):
    rows = e2e.time_variants(tiny_variants, TINY.vocab_size, threads=[1], prompts=[4], decode_prompt=5, new_tokens=3,
                             repeats=1)
    assert len(rows) == 2 * len(tiny_variants)
    assert all(r["tokens_per_s"]["median"] > 0 and len(r["tokens_per_s"]["runs"]) == 1 for r in rows)
    assert {r["metric"] for r in rows} == {"prefill 4", "decode 3"}
    profile = [e2e.decode_profile(v, TINY.vocab_size, 1, decode_prompt=5, steps=2) for v in tiny_variants]
    for variant, p in zip(tiny_variants, profile):
        if variant.runner.fast_decoder is None:
            assert p is None  # the reference backend has no fast path to profile
        else:
            assert p["matmuls_ms"] > 0
            assert p["mpgemm_share_fast"] == pytest.approx(p["matmuls_ms"] / p["fast_step_ms"], rel=1e-2)
    result = {"model": {"name": "tiny"}, "machine": e2e.machine(), "load_average": {"start": "0", "end": "0"},
              "method": "test", "rows": rows, "targets": [], "profile": [p for p in profile if p]}
    paths = e2e.write_results(result, tmp_path, "e2e_tiny", as_json=True)
    assert [p.name for p in paths] == ["e2e_tiny.md", "e2e_tiny.png", "e2e_tiny.json"]
    text = paths[0].read_text()
    assert "| lutlm | 2-bit reference | 3.00 | 4-bit g32 | 1 |" in text
    assert ("Decode step profile" in text) == cpu.available()
    assert json.loads(paths[2].read_text())["rows"][0]["metric"] == "prefill 4"
    assert paths[1].stat().st_size > 10_000


def test_targets_compare_with_the_fastest_peer():
    def row(engine, kind, metric, threads, speed):
        return {"engine": engine, "kind": kind, "metric": metric, "threads": threads, "tokens_per_s": {"median": speed}}

    rows = [row("lutlm", "ternary", "decode 128", 1, 30.0), row("llama.cpp", "TQ1_0", "decode 128", 1, 10.0),
            row("llama.cpp", "TQ2_0", "decode 128", 1, 25.0), row("lutlm", "2-bit", "decode 128", 2, 20.0),
            row("llama.cpp", "Q2_K", "decode 128", 2, 10.0)]
    targets = {t["target"]: t for t in e2e.check_targets("llama2-7b", rows)}
    ternary = targets["decode 1 thread: lutlm ternary vs llama.cpp TQ2_0"]
    assert (ternary["ratio"], ternary["required"], ternary["met"]) == (1.2, 1.5, False)
    assert targets["decode 2 threads: lutlm 2-bit vs llama.cpp Q2_K"]["met"]
    assert len(targets) == 2  # targets without both measurements are left out
    assert e2e.check_targets("smollm2", rows) == []


def test_bad_options_are_refused_with_clear_messages():
    parser = argparse.ArgumentParser()
    e2e.add_parser(parser.add_subparsers())
    with pytest.raises(ValueError, match="unknown model 'gpt2' for bench e2e"):
        e2e.run(parser.parse_args(["e2e", "--models", "gpt2"]))
    with pytest.raises(ValueError, match="--threads takes comma-separated integers, got '1,two'"):
        e2e.run(parser.parse_args(["e2e", "--models", "smollm2", "--threads", "1,two"]))
    with pytest.raises(ValueError, match="--prompts takes positive integers, got '0'"):
        e2e.run(parser.parse_args(["e2e", "--models", "smollm2", "--prompts", "0"]))


@pytest.mark.skipif(not peer.available(), reason="llama-cpp-python (the peer) is not installed")
def test_synthetic_gguf_is_quantized_and_timed_by_llama_cpp(bundled, tmp_path):
    """A tiny random model with the bundled vocabulary, written as F16 GGUF, quantized by
    llama.cpp to Q4_0 and timed through the peer's helpers."""
    from lutlm.formats.gguf_writer import save_gguf

    vocabulary = bundled[2].tokenizer
    config = ModelConfig(**{**TINY.to_dict(), "vocab_size": len(vocabulary.tokens)})
    source = tmp_path / "tiny-F16.gguf"
    save_gguf(synthetic.random_checkpoint(config, vocabulary), source, "F16")
    (variant,) = e2e.peer_variants(str(source), "F16", ["Q4_0"], "tiny", tmp_path, context=32)
    assert variant.bits_per_weight == 4.5  # Q4_0: 18 bytes per block of 32
    variant.runner.set_threads(1)
    prompt = e2e.prompt_tokens(config.vocab_size, 8)
    assert variant.runner.prefill_seconds(prompt) > 0
    assert variant.runner.decode_seconds(3) > 0
    with pytest.raises(ValueError, match="a prompt of 40 tokens exceeds"):
        variant.runner.prefill_seconds(prompt * 5)


@pytest.mark.parametrize("installed,requested,said", [
    (True, True, "llama-cpp-python 9.9"),
    (True, False, "not run (--no-peer)"),
    (False, True, "not run (llama-cpp-python not installed)"),
])
def test_reports_say_why_the_peer_did_not_run(monkeypatch, installed, requested, said):
    monkeypatch.setattr(peer, "available", lambda: installed)
    monkeypatch.setattr(peer, "version", lambda: "9.9")
    assert peer.run_description(requested) == said
