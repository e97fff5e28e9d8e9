"""The GPU decode path: the fused operations of lutlm.kernels.gpu_ops against model.py's PyTorch
code, and GpuDecoder's steps against model.forward.

Without a GPU everything runs on the CPU through Triton's interpreter (fp16 tensors on the CPU,
no CUDA graph); with CUDA the same tests run on the device and GpuDecoder replays its graph.

Tolerances. The fused operations compute in fp32 and round to fp16 once, where PyTorch rounds
after every fp16 operation: each output differs by a few fp16 ulps (2^-11 relative each), so
outputs are compared at 4e-3 relative to their scale. Whole steps chain two layers and the head
through such roundings; logits (of order 1 to 10) are compared at 2e-2 of the largest.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from lutlm.gpu_decode import GpuDecoder, gpu_decoder_for, stack_rows, unsupported_reason  # noqa: E402
from lutlm.kernels import gpu, gpu_ops  # noqa: E402
from lutlm.kv_cache import KVCache  # noqa: E402
from lutlm.linear import PackedLinear  # noqa: E402
from lutlm.loader import build_model, to_fp16  # noqa: E402
from lutlm.model import RMSNorm, rope_tables, rotate_half  # noqa: E402
from test_fast_decode import packed_checkpoint, tiny_config  # noqa: E402
from tiny_checkpoint import tiny_checkpoint  # noqa: E402

DEVICE = gpu.device()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).half().to(DEVICE)


def assert_close_to_scale(got, expected, rel):
    scale = expected.float().abs().max().item()
    err = (got.float() - expected.float()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} exceeds {rel} of the scale {scale:.3g}"


@pytest.mark.parametrize("dim", [64, 576, 100])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_model(dim, with_delta):
    x, delta = randn(2, dim, seed=1), randn(2, dim, seed=2)
    norm = RMSNorm(dim, 1e-5).to(DEVICE)
    norm.weight.data = (torch.rand(dim) + 0.5).half().to(DEVICE)
    expected_x = x + delta if with_delta else x.clone()
    expected = norm(expected_x)
    out = torch.empty_like(x)
    gpu_ops.add_rms_norm(x, delta if with_delta else None, norm.weight.data, 1e-5, out)
    torch.testing.assert_close(x, expected_x, rtol=0, atol=0)  # the residual, updated in place
    assert_close_to_scale(out, expected, 4e-3)


@pytest.mark.parametrize("splits", [None, 1, 2])
@pytest.mark.parametrize("n_heads,n_kv,head_dim,pos",
                         [(4, 2, 16, 0), (9, 3, 64, 70), (4, 4, 128, 130), (4, 2, 64, 1500), (2, 2, 128, 1100)])
def test_rope_attention_matches_model(n_heads, n_kv, head_dim, pos, splits):
    """q and k rotated as model.py does, k and v cached at `pos` and nowhere else, and the
    attention over positions 0..pos against SDPA, with the positions read by one program per
    head, or by several whose results are merged (None: the default, 4 under the interpreter;
    position 0 leaves all splits but the last empty). The cache holds random values elsewhere:
    those past `pos` must not be read. The last two cases span several blocks of cached positions
    per split (gpu_ops.ATTENTION_TILE), the online softmax's rescaling between blocks."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    qkv = randn((n_heads + 2 * n_kv) * head_dim, seed=pos)
    cache_len = pos + 30
    k_cache, v_cache = randn(1, n_kv, cache_len, head_dim, seed=3), randn(1, n_kv, cache_len, head_dim, seed=4)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = torch.empty(n_heads, head_dim, dtype=torch.float16, device=DEVICE)
    position = torch.tensor([pos], dtype=torch.int32, device=DEVICE)
    for _ in range(2):  # the second call sees what the first left: merge counts back at zero
        out.zero_()
        gpu_ops.rope_attention(qkv, inv_freq.to(DEVICE), position, k_cache, v_cache, out, splits)

    cos, sin = rope_tables(inv_freq, pos, 1, torch.float16)
    q, k, v = qkv.cpu().split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim])
    q, k = q.view(n_heads, head_dim), k.view(n_kv, head_dim)
    assert_close_to_scale(k_cache[0, :, pos].cpu(), k * cos + rotate_half(k) * sin, 4e-3)
    torch.testing.assert_close(v_cache[0, :, pos].cpu(), v.view(n_kv, head_dim), rtol=0, atol=0)
    others = torch.ones(cache_len, dtype=torch.bool)
    others[pos] = False
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others])  # nothing else written
    assert torch.equal(v_cache[:, :, others], v_before[:, :, others])
    q = q * cos + rotate_half(q) * sin
    expected = F.scaled_dot_product_attention(q.float().view(1, n_heads, 1, head_dim),
                                              k_cache[:, :, : pos + 1].float().cpu(),
                                              v_cache[:, :, : pos + 1].float().cpu(), enable_gqa=True)
    assert_close_to_scale(out.cpu(), expected.view(n_heads, head_dim), 4e-3)


@pytest.mark.parametrize("width", [96, 1536, 3000])
def test_silu_mul_matches_torch(width):
    gate_up = randn(2 * width, seed=6) * 3
    out = torch.empty(width, dtype=torch.float16, device=DEVICE)
    gpu_ops.silu_mul(gate_up, out)
    gate, up = gate_up.float().chunk(2)
    assert_close_to_scale(out, F.silu(gate) * up, 4e-3)


def forward_then_decoder(model, steps: int = 5):
    """Logits of `steps` tokens fed one at a time: model.forward, then a GpuDecoder on a copy
    of the same weights with its own cache."""
    tokens = torch.randint(0, model.config.vocab_size, (steps,), generator=torch.Generator().manual_seed(1))
    model.setup_cache(1, 32)
    with torch.inference_mode():
        expected = torch.stack([model(tokens[p].view(1, 1).to(DEVICE), p, last_logits_only=True)[0, -1].float()
                                for p in range(steps)])
    for cache in model.cache.keys + model.cache.values:  # a clean cache for the decoder
        cache.zero_()
    decoder = GpuDecoder(model)
    got = torch.stack([decoder(int(tokens[p]), p).clone() for p in range(steps)])
    return expected, got


@pytest.mark.parametrize("overrides,bits,group", [
    ({}, 4, 32),
    ({"num_key_value_heads": 4, "intermediate_size": 128}, 2, 64),
])
def test_decoder_matches_forward_on_packed_weights(overrides, bits, group):
    checkpoint = packed_checkpoint(tiny_config(**overrides), bits, group, pack_head=False)
    model = to_fp16(build_model(checkpoint, "cuda"), DEVICE)
    assert isinstance(model.model.layers[0].self_attn.q_proj, PackedLinear)
    expected, got = forward_then_decoder(model)
    assert_close_to_scale(got, expected, 2e-2)


def test_decoder_matches_forward_on_fp16_weights():
    model = to_fp16(build_model(tiny_checkpoint(), "reference"), DEVICE)
    expected, got = forward_then_decoder(model)
    assert_close_to_scale(got, expected, 2e-2)


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("packed", [True, False])
def test_stacking_keeps_one_copy_of_the_weights(packed):
    """The stacked product gives its parts' outputs; the parts then read views of the stacked
    weights (no second copy), and the model's own forward over several tokens (prefill, through
    the GEMM kernels on those views) computes what it did before."""
    checkpoint = packed_checkpoint(tiny_config(), 4, 32, pack_head=False) if packed else tiny_checkpoint()
    model = to_fp16(build_model(checkpoint, "cuda" if packed else "reference"), DEVICE)
    tokens = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    model.setup_cache(1, 16)
    with torch.inference_mode():
        before = model(tokens.to(DEVICE), 0)
    a = model.model.layers[0].self_attn
    parts = [a.q_proj, a.k_proj, a.v_proj]
    x = randn(2, 64, seed=7)
    expected = torch.cat([part(x) for part in parts], dim=-1)
    stacked = stack_rows(parts)
    if packed:
        whole = stacked.handle.dequant
        for part in parts:
            layout = part.handle.dequant
            assert [storage(t) for t in (layout.words[0], layout.scales, layout.zeros)] == \
                [storage(t) for t in (whole.words[0], whole.scales, whole.zeros)]
    else:
        assert all(storage(part.weight) == storage(stacked.weight) for part in parts)
    torch.testing.assert_close(stacked(x), expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(torch.cat([part(x) for part in parts], dim=-1), expected, rtol=2e-3, atol=2e-3)
    GpuDecoder(model)  # stacks q/k/v and gate/up of every layer
    with torch.inference_mode():
        after = model(tokens.to(DEVICE), 0)
    assert_close_to_scale(after, before, 1e-3)


def test_decoder_refuses_bad_calls_and_follows_the_cache():
    model = to_fp16(build_model(tiny_checkpoint(), "reference"), DEVICE)
    decoder = GpuDecoder(model)
    with pytest.raises(ValueError, match="call model.setup_cache first"):
        decoder(1, 0)
    model.setup_cache(1, 8)
    decoder(3, 0)
    with pytest.raises(ValueError, match="position 8 does not fit the KV cache of 8 positions"):
        decoder(3, 8)
    with pytest.raises(ValueError, match="token 128 is outside the vocabulary of 128"):
        decoder(128, 1)
    model.setup_cache(1, 16)  # a new cache: the decoder must write into it
    decoder(3, 0)
    assert model.cache.keys[0][0, :, 0].abs().sum() > 0
    own = KVCache(model.config, 1, 8, torch.float16, DEVICE)  # or into one passed to it
    decoder(3, 0, own)
    assert own.keys[0][0, :, 0].abs().sum() > 0


def test_unsupported_models_fall_back_with_a_reason():
    float32_model = build_model(tiny_checkpoint(), "reference")
    assert unsupported_reason(float32_model) in ("the model's float tensors are not fp16",
                                                 "the model is not on a CUDA device")
    assert gpu_decoder_for(float32_model) is None
    if DEVICE.type == "cpu":
        cpu_packed = to_fp16(build_model(packed_checkpoint(tiny_config()), "cpu"), DEVICE)
        assert "packed for the cpu backend" in unsupported_reason(cpu_packed)
