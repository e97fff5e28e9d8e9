"""A GGUF of every block type runs on lutlm's kernels as loaded, with no flag.

For each type (tiny files: tests/tiny_gguf.py, linears and the untied head in that type):
every linear and the head are packed linears on the CPU kernels (0 float linears), the fast
decode path takes the model, each product agrees with the float path's linear (the file's
blocks dequantized by the reference decoders) within the bound the mapping and the kernels
state, and greedy decoding on the exact (float-table) decode path gives the reference path's
tokens. The bundled model (Q4_1 linears, tied Q8_0 embedding and head) runs the same way,
its embedding kept in blocks.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from tiny_gguf import write_tiny_gguf

from lutlm.embedding import BlockEmbedding
from lutlm.fast_decode import FastDecoder, fast_decoder_for
from lutlm.formats import load_checkpoint
from lutlm.formats.gguf_packed import SUPER_TYPES
from lutlm.kernels import cpu
from lutlm.linear import PackedLinear, linear_summary
from lutlm.loader import checkpoint_model, load_model

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels are not built")

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0"]
LAYERS = 2


@pytest.fixture(scope="module", params=TYPES)
def models(request, tmp_path_factory):
    kind = request.param
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{kind}.gguf"
    write_tiny_gguf(path, kind, head_type=kind)
    checkpoint = load_checkpoint(str(path))  # the tiny vocabulary has no merges: no tokenizer
    native = checkpoint_model(checkpoint), None, checkpoint
    reference = checkpoint_model(checkpoint, backend="reference"), None, checkpoint
    return kind, native, reference


def test_every_linear_runs_on_the_kernels(models):
    kind, (model, _, checkpoint), _ = models
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 7 * LAYERS + 1
    assert all(m.backend_name == "cpu" and m.kernel in ("lut", "dot") for m in packed)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert linear_summary(model, checkpoint.tensor_types).endswith("0 float linears")
    assert f"{7 * LAYERS + 1} x {kind} -> " in linear_summary(model, checkpoint.tensor_types)
    if kind in SUPER_TYPES:  # the K-quants keep their own two-level scales, on the dot kernels
        assert all(m.handle.scale_layout == SUPER_TYPES[kind][0] and m.kernel == "dot" for m in packed)
        assert "k-scales" in linear_summary(model, checkpoint.tensor_types)
    assert fast_decoder_for(model) is not None


def test_each_product_matches_the_float_path(models):
    """|y - y_ref| <= 2^-10 sum_k (|w_k| + m_k) |x_k| + 2^-16 sum_k |w_k| |x_k|: the first term
    covers the fp16 rounding of s and z (each weight moves by at most 2^-11 (|s q| + |s z|),
    and |s q| + |s z| <= |w| + 2 |s z| with |s z| at most the group's magnitude m_k, bounded here by
    its largest |w| plus |s| 2^bits), the second fp32 accumulation. Float tables: no activation
    rounding. A wiring error (rows, groups, scales) gives errors of the order of |y| itself."""
    kind, (model, _, _), (ref, _, _) = models
    g = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if not isinstance(module, PackedLinear):
            continue
        w = ref.get_submodule(name).weight.detach()
        x = torch.randn(3, module.in_features, generator=g)
        y = cpu.matmul(x, module.handle, mode="float")
        y_ref = x @ w.T
        group = module.group_size
        magnitude = w.abs().view(w.shape[0], -1, group).amax(-1, keepdim=True).expand(-1, -1, group).reshape(w.shape)
        bound = 2 ** -10 * ((w.abs() + 2 * magnitude) @ x.abs().T).T + 2 ** -16 * (x.abs() @ w.abs().T)
        excess = ((y - y_ref).abs() - bound).max()
        assert excess <= 0, f"{kind} {name}: error above the bound by {float(excess):.3g}"


def test_int8_path_stays_close_to_the_float_path(models):
    """The int8 activations (and tables) of the default path: logits within 10% (relative L2) of
    the reference path's over a prompt; wrong wiring gives about 100%."""
    kind, (model, _, _), (ref, _, _) = models
    tokens = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127]])
    for m in (model, ref):
        m.setup_cache(1, 16, fresh=True)
    with torch.inference_mode():
        ours, theirs = model(tokens)[0], ref(tokens)[0]
    assert float((ours - theirs).norm() / theirs.norm()) < 0.1


def greedy(step, first: int, n: int) -> list[int]:
    tokens, logits = [first], None
    for pos in range(n):
        logits = step(tokens[-1], pos)
        tokens.append(int(torch.argmax(logits)))
    return tokens[1:]


def test_greedy_tokens_equal_the_reference_on_the_exact_path(models):
    kind, (model, _, _), (ref, _, _) = models
    model.setup_cache(1, 32, fresh=True)
    ref.setup_cache(1, 32, fresh=True)
    fast = FastDecoder(model, table_mode="float")

    def reference_step(token: int, pos: int) -> torch.Tensor:
        with torch.inference_mode():
            return ref(torch.tensor([[token]]), pos)[0, -1]

    ours, theirs = greedy(fast, 3, 12), greedy(reference_step, 3, 12)
    assert ours == theirs, f"{kind}: {ours} != {theirs}"


def test_bundled_model_runs_on_the_kernels_with_its_embedding_in_blocks(bundled_path, bundled):
    model, _, checkpoint = load_model(bundled_path)
    assert isinstance(model.model.embed_tokens, BlockEmbedding)
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.bits == 8
    assert linear_summary(model, checkpoint.tensor_types) == (
        f"210 x Q4_1 -> {model.model.layers[0].mlp.up_proj.kernel} 4-bit g32, 1 x Q8_0 -> dot 8-bit g32, "
        "0 float linears")
    reference = bundled[0]
    ids = np.array([0, 1, 500, 49151])
    assert torch.equal(model.model.embed_tokens.lookup(ids), reference.model.embed_tokens.weight[ids])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.model.embed_tokens.lookup(np.array([49152]))


def test_bundled_model_greedy_tokens_equal_the_reference_on_the_exact_path(bundled_path, bundled):
    """The default load's decode path with float tables (exact up to float rounding and the
    fp16 rounding of Q4_1's zero points) continues a prompt with the reference path's tokens."""
    model, tokenizer, _ = load_model(bundled_path)
    reference = bundled[0]
    prompt = tokenizer.encode("The capital of France is")
    for m in (model, reference):
        m.setup_cache(1, 64, fresh=True)
    fast = FastDecoder(model, table_mode="float")

    def run(step) -> list[int]:
        for pos, token in enumerate(prompt[:-1]):
            step(token, pos)
        tokens = [prompt[-1]]
        for pos in range(len(prompt) - 1, len(prompt) + 15):
            tokens.append(int(torch.argmax(step(tokens[-1], pos))))
        return tokens[1:]

    def reference_step(token: int, pos: int) -> torch.Tensor:
        with torch.inference_mode():
            return reference(torch.tensor([[token]]), pos)[0, -1]

    assert run(fast) == run(reference_step)


@pytest.mark.parametrize("kernel,bits,group", [("lut", 4, 32), ("lut", 2, 256), ("dot", 6, 16), ("dot", 8, 32)])
def test_layout_in_row_chunks_equals_the_whole(kernel, bits, group):
    """Laying a weight out chunk by chunk (16-row tiles) writes the bytes of the one-piece layout."""
    g = torch.Generator().manual_seed(bits)
    n, k = 100, 512
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.randn(n, k // group, generator=g).half()
    zeros = torch.randn(n, k // group, generator=g).half()
    whole = cpu.prepare_codes(codes, scales, zeros, bits, group, kernel=kernel)
    cuts = [0, 32, 48, 96, n]
    chunks = [(codes[a:b], scales[a:b], zeros[a:b]) for a, b in zip(cuts, cuts[1:])]
    parts = cpu.prepare_code_rows(n, k, bits, group, chunks, kernel)
    assert torch.equal(whole.codes, parts.codes) and torch.equal(whole.scales.view(torch.int16),
                                                                 parts.scales.view(torch.int16))
    x = torch.randn(2, k, generator=g)
    assert torch.equal(cpu.matmul(x, whole), cpu.matmul(x, parts))
    with pytest.raises(ValueError, match="whole 16-row tiles"):
        cpu.prepare_code_rows(n, k, bits, group, [(codes[:8], scales[:8], zeros[:8]), (codes[8:], scales[8:],
                                                                                        zeros[8:])], kernel)
    with pytest.raises(ValueError, match="gave 32 of the weight's 100 rows"):
        cpu.prepare_code_rows(n, k, bits, group, chunks[:1], kernel)


def test_layout_cache_is_written_then_mapped(tmp_path, monkeypatch):
    """A load with a layout cache writes the kernels' layout once; the next load maps it (no
    block is decoded) and computes the same logits; a damaged or stale file is not read."""
    import lutlm.kernels.ggml_native as ggml_native

    path = tmp_path / "tiny-Q4_K.gguf"
    write_tiny_gguf(path, "Q4_K", head_type="Q6_K")
    cache = tmp_path / "layouts"
    tokens = torch.tensor([[1, 2, 3, 4, 5]])

    def logits(model):
        model.setup_cache(1, 8, fresh=True)
        with torch.inference_mode():
            return model(tokens)[0]

    first = logits(checkpoint_model(load_checkpoint(str(path)), layout_cache=str(cache)))
    files = list(cache.glob("tiny-Q4_K-*.lutlm-layout"))
    assert len(files) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached layout was decoded again")

    with monkeypatch.context() as m:
        m.setattr(ggml_native, "ggml_groups_native", no_decoding)
        m.setattr(ggml_native, "super_dot_layout", no_decoding)
        mapped = checkpoint_model(load_checkpoint(str(path)), layout_cache=str(cache))
        assert torch.equal(logits(mapped), first)
    files[0].write_bytes(files[0].read_bytes()[:100])  # damaged: laid out anew, and rewritten
    assert torch.equal(logits(checkpoint_model(load_checkpoint(str(path)), layout_cache=str(cache))), first)
    assert files[0].stat().st_size > 100
    os.utime(path, ns=(1, 1))  # another modification time: another key, another file
    checkpoint_model(load_checkpoint(str(path)), layout_cache=str(cache))
    assert len(list(cache.glob("tiny-Q4_K-*.lutlm-layout"))) == 2


def test_thread_counts_are_capped_at_the_cores(capsys):
    from lutlm.cli import set_threads

    before = torch.get_num_threads()
    try:
        set_threads(1000)
        cores = len(os.sched_getaffinity(0))
        assert cpu.get_num_threads() == cores and torch.get_num_threads() == cores
        assert f"-t 1000 is more than the {cores} cores" in capsys.readouterr().err
        with pytest.raises(ValueError, match="at least 1"):
            set_threads(0)
    finally:
        set_threads(before)
