"""The K-quants' own two-level scales on the dot kernels (csrc/lutlm.h, "Super-block scales").

Q2_K, Q3_K, Q4_K, Q5_K and Q6_K keep, per 256-weight block, fp16 d and dmin and a small integer
sc (and m) per sub-block: w = (d sc) q - dmin m. The kernels read them as the file stores them
(Q2_K 2.625 bits per weight, not 4 with an fp16 scale and zero per group of 16).

Decoding: lutlm.formats.gguf_packed.ggml_super (numpy) gives gguf-py's dequantization bit for
bit (the same float32 products in the same order); the native layout (super_dot_layout), decoded
in C++, has the bytes cpu.prepare_super_rows writes from it.

Kernels, per output y[b, n], with s_g = d sc_g and t_g = dmin m_g (= dmin sc_g where symmetric):
the kernels form s_g dx sum_k q_k xq_k - t_g xsum_g per group and add K / 16 such terms, so the
bounds of tests/test_dot_kernels.py hold with M = sum_k (|s_g(k)| q_k + |t_g(k)|) |x'_k|:
    rounding:     |y - y_ref| <= 2 (K + 64) u M          (u = 2^-24; float mode: this alone)
    activations:  |y - y_ref| <= sum_k |w_k| dx_k / 2    (int8: per q-block of 32 inputs)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import restore_cpu_kernel_defaults
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from test_ggml_groups import random_fields
from lutlm.formats.ggml_encode import encode_blocks
from lutlm.formats.gguf_packed import SUPER_TYPES, ggml_groups, ggml_super
from lutlm.kernels import cpu
from lutlm.kernels.ggml_native import super_dot_layout

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels are not built")

KINDS = list(SUPER_TYPES)
ISAS = [isa for isa in cpu.ISAS if cpu.ISAS.index(isa) <= cpu.ISAS.index(cpu.best_isa())] if cpu.available() else []
U = 2.0**-24


@pytest.fixture(autouse=True)
def restore_kernel_settings():
    yield
    restore_cpu_kernel_defaults()


def random_tensor(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw blocks of an [n, k] tensor with random valid fields (zero sub-scales included)."""
    f = random_fields(kind, n * k // 256, np.random.default_rng(seed))
    return encode_blocks(kind, f["codes"], f["d"], f["dmin"], f.get("scales"), f.get("mins"))


def handle_of(sup, chunk_rows: int | None = None):
    n, k = sup.codes.shape
    step = chunk_rows or n
    chunks = [(torch.from_numpy(sup.codes[r:r + step]), sup.d[r:r + step], sup.dmin[r:r + step], sup.sc[r:r + step],
               None if sup.m is None else sup.m[r:r + step]) for r in range(0, n, step)]
    return cpu.prepare_super_rows(n, k, sup.bits, sup.group_size, sup.scale_layout, chunks)


def activations(batch: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, k, generator=g) * (1 + 8 * (torch.rand(k, generator=g) > 0.98))


def per_input(t: np.ndarray, times: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(t, dtype=np.float32)).repeat_interleave(times, dim=1)


def reach(sup) -> torch.Tensor:
    """|s_g| q_k + |t_g| per weight [N, K]."""
    per = sup.super_groups
    s = per_input(sup.d, per) * torch.from_numpy(sup.sc.astype(np.float32))
    t = per_input(sup.dmin, per) * torch.from_numpy((sup.sc if sup.m is None else sup.m).astype(np.float32))
    q = torch.from_numpy(sup.codes.astype(np.float32))
    return s.abs().repeat_interleave(sup.group_size, 1) * q + t.abs().repeat_interleave(sup.group_size, 1)


def dx_per_input(x: torch.Tensor) -> torch.Tensor:
    b, k = x.shape
    return (x.abs().view(b, -1, 32).amax(-1, keepdim=True) / 127).expand(-1, -1, 32).reshape(b, k)


def rounded(x: torch.Tensor) -> torch.Tensor:
    b, k = x.shape
    blocks = x.view(b, -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127)).view(b, k)


def check(y, y_ref, bound):
    worst = ((y - y_ref).abs() / bound).max().item()
    assert worst <= 1.0, f"error {(y - y_ref).abs().max().item():.3g} exceeds its bound by {worst:.2f}x"


@pytest.mark.parametrize("kind", KINDS)
def test_two_level_decoding_is_gguf_bit_for_bit(kind):
    n, k = 7, 768
    raw = random_tensor(kind, n, k)
    sup = ggml_super(raw, kind, (n, k))
    expected = gguf_dequantize(raw.reshape(n, -1), GGMLQuantizationType[kind])
    np.testing.assert_array_equal(sup.dequantize(), expected)
    groups = ggml_groups(raw, kind, (n, k))
    flat = (groups.zeros == -1) & (groups.codes.reshape(n, -1, sup.group_size) == 0).all(-1)  # constant groups
    same = ~np.repeat(flat, sup.group_size, axis=1)
    np.testing.assert_array_equal(sup.codes[same], groups.codes[same])  # the same codes, none flattened
    assert (sup.m is None) == (SUPER_TYPES[kind][1] is not None)


def test_two_level_decoding_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="Q4_0 has no two-level scales"):
        ggml_super(np.zeros(18, np.uint8), "Q4_0", (1, 32))
    f = random_fields("Q6_K", 1, np.random.default_rng(0))
    f["d"][:] = 60000  # d * 32 overflows fp16
    raw = encode_blocks("Q6_K", f["codes"], f["d"], f["dmin"], f.get("scales"), f.get("mins"))
    with pytest.raises(ValueError, match="d times its zero does not fit fp16"):
        ggml_super(raw, "Q6_K", (1, 256))
    with pytest.raises(ValueError, match="d times its zero does not fit fp16"):
        super_dot_layout(raw, "Q6_K", (1, 256))


def test_layout_bytes_are_the_format_note():
    """Tile 0, super-block 1 of a Q4_K weight: d[16], dmin[16] as fp16, then sc[8][16], m[8][16]."""
    n, k = 20, 512
    sup = ggml_super(random_tensor("Q4_K", n, k), "Q4_K", (n, k))
    h = handle_of(sup)
    assert h.scales.dtype == torch.uint8 and tuple(h.scales.shape) == (2, 2, 64 + 2 * 16 * 8)
    block = h.scales[0, 1].numpy()
    np.testing.assert_array_equal(block[:32].view(np.float16), sup.d[:16, 1])
    np.testing.assert_array_equal(block[32:64].view(np.float16), sup.dmin[:16, 1])
    np.testing.assert_array_equal(block[64:192].view(np.int8).reshape(8, 16), sup.sc[:16, 8:16].T)
    np.testing.assert_array_equal(block[192:].view(np.int8).reshape(8, 16), sup.m[:16, 8:16].T)
    tile1 = h.scales[1, 0].numpy()  # rows 16..19, then 12 padded rows of 0
    np.testing.assert_array_equal(tile1[:32].view(np.float16)[:4], sup.d[16:, 0])
    assert not tile1[:32].view(np.float16)[4:].any() and not tile1[64:].reshape(16, 16)[:, 4:].any()
    q2 = ggml_super(random_tensor("Q2_K", n, k), "Q2_K", (n, k))
    nib = handle_of(q2).scales[0, 0].numpy()
    assert nib.size == 64 + 16 * 16
    np.testing.assert_array_equal(nib[64:].reshape(16, 16), ((q2.sc & 15) | (q2.m << 4)).view(np.uint8)[:16, :16].T)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", KINDS)
def test_kernels_within_their_bounds_on_every_isa(kind, isa):
    cpu.set_isa(isa)
    n, k = 37, 768  # three tiles, the last partial
    sup = ggml_super(random_tensor(kind, n, k, seed=3), kind, (n, k))
    h = handle_of(sup)
    w = torch.from_numpy(sup.dequantize())
    x = activations(9, k)
    y_ref = x.double() @ w.double().T
    m_abs = reach(sup)
    float_bound = 2 * (k + 64) * U * (x.abs() @ m_abs.T)
    x8 = x.abs() + dx_per_input(x) / 2
    exact = 2 * (k + 64) * U * (x8 @ m_abs.T)
    int8_bound = (dx_per_input(x) / 2) @ w.abs().T + exact
    y_rounded = rounded(x).double() @ w.double().T
    for batch in (1, 2, 9):  # one token (GEMV), and the token blocks of the GEMM
        check(cpu.matmul(x[:batch], h, mode="float").double(), y_ref[:batch], float_bound[:batch])
        y = cpu.matmul(x[:batch], h).double()
        check(y, y_ref[:batch], int8_bound[:batch])
        check(y, y_rounded[:batch], exact[:batch])  # the integer sums are exact


@pytest.mark.parametrize("kind", ["Q2_K", "Q4_K", "Q6_K"])
def test_threads_k_split_and_row_chunks_agree(kind):
    # 48 rows are 3 tiles: one token on 2 threads also splits K; 70 tokens span two token blocks.
    cpu.set_parallel_threshold(0)
    n, k = 48, 2304
    sup = ggml_super(random_tensor(kind, n, k, seed=5), kind, (n, k))
    h, chunked = handle_of(sup), handle_of(sup, chunk_rows=16)
    assert torch.equal(h.codes, chunked.codes) and torch.equal(h.scales, chunked.scales)
    w = torch.from_numpy(sup.dequantize())
    x = activations(70, k)
    y_ref = x.double() @ w.double().T
    bound = (dx_per_input(x) / 2) @ w.abs().T + 2 * (k + 64) * U * ((x.abs() + dx_per_input(x) / 2) @ reach(sup).T)
    results = {}
    for threads in (1, 2):
        cpu.set_num_threads(threads)
        for batch in (1, 70):
            results[threads, batch] = cpu.matmul(x[:batch], h)
            check(results[threads, batch].double(), y_ref[:batch], bound[:batch])
    assert torch.equal(results[1, 70], results[2, 70])  # tokens split over threads, not K


@pytest.mark.parametrize("kind", KINDS)
def test_native_layout_straight_from_blocks_is_the_reference_layout(kind):
    """super_dot_layout (decoded and laid out a tile at a time in C++, rows in a given order)
    writes prepare_super_rows' bytes from the reference decoder's arrays."""
    n, k = 37, 768
    raw = random_tensor(kind, n, k, seed=7)
    row_of = np.random.default_rng(0).permutation(n)
    sup = ggml_super(raw.reshape(n, -1)[row_of], kind, (n, k))
    expected, got = handle_of(sup), super_dot_layout(raw, kind, (n, k), row_of)
    assert torch.equal(got.codes, expected.codes) and torch.equal(got.scales, expected.scales)
    assert got.scale_layout == expected.scale_layout == SUPER_TYPES[kind][0]
    x = activations(3, k)
    assert torch.equal(cpu.matmul(x, got), cpu.matmul(x, expected))
    with pytest.raises(ValueError, match="row_of must give a source row"):
        super_dot_layout(raw, kind, (n, k), row_of[:5])


def test_fewer_bytes_than_fp16_scales():
    n, k = 64, 4096
    for kind, bits_per_weight in (("Q2_K", 2.625), ("Q3_K", 3.625), ("Q4_K", 4.625), ("Q5_K", 5.625),
                                  ("Q6_K", 6.625)):
        h = handle_of(ggml_super(random_tensor(kind, n, k), kind, (n, k)))
        assert h.nbytes * 8 / (n * k) == bits_per_weight, kind


def test_bad_layouts_are_refused():
    sup = ggml_super(random_tensor("Q4_K", 16, 256), "Q4_K", (16, 256))
    chunk = [(torch.from_numpy(sup.codes), sup.d, sup.dmin, sup.sc, sup.m)]
    with pytest.raises(ValueError, match="unknown two-level scale layout 'f16'"):
        cpu.prepare_super_rows(16, 256, 4, 32, "f16", chunk)
    with pytest.raises(ValueError, match="groups of 16 or 32"):
        cpu.prepare_super_rows(16, 256, 4, 64, "super", chunk)
    with pytest.raises(ValueError, match="the symmetric layout takes no m"):
        cpu.prepare_super_rows(16, 256, 4, 32, "symmetric", chunk)
    with pytest.raises(ValueError, match="row chunks gave 16 of the weight's 32 rows"):
        cpu.prepare_super_rows(32, 256, 4, 32, "super", chunk)


def test_ctypes_mirror_of_the_weight_descriptor_matches_the_c_struct():
    """cpu._Weight mirrors lutlm_weight (csrc/lutlm.h): the same size and field offsets, as the
    compiler laid the struct out."""
    import ctypes

    offsets = (ctypes.c_int64 * 11)()
    size = cpu.library().lutlm_weight_layout(offsets)
    assert size == ctypes.sizeof(cpu._Weight)
    assert list(offsets) == [getattr(cpu._Weight, name).offset for name, _ in cpu._Weight._fields_]
