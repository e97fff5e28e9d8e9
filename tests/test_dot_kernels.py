"""The CPU dot-product kernels ("dot": csrc/dequant*.cpp, the DOT layout of csrc/lutlm.h): every
bit-width 1..8, groups of 16, multiples of 32 and whole rows, on every instruction set, against
the dequantized product (reference.matmul, i.e. PackedWeight.dequantize() @ x).

Error bounds, per output element y[b, n]; u = 2^-24 is fp32's unit roundoff, w_k = s (q_k - z)
the dequantized weights, g(k) the group of input k.

int8 activations (modes "int8" and "fast"). Each q-block of Q inputs (32 for groups of 16) is
rounded to multiples of dx = max|x| / 127, so each activation is off by at most dx / 2. The
integer sums sum_k q_k xq_k are exact, and the zero point multiplies the sum of the *rounded*
activations, so the kernel computes sum_k w_k xr_k (xr the rounded activations) up to float
rounding, and
    activations:  |y - y_ref| <= sum_k |w_k| dx_k / 2
Float rounding: the kernels form dx sum q xq and z xsum apart (one group or q-block at a time)
and add K / 16 or fewer such terms; the reference sums K products. Every partial sum on either
side is at most
    M = sum_k |s_g(k)| (q_k + |z_g(k)|) |x'_k|      (x' = x in float mode, |x| + dx / 2 in int8)
and neither side chains more than K + 64 roundings, so
    rounding:     |y - y_ref| <= 2 (K + 64) u M
Float mode ("float") has the rounding term only. The int8 result is also held to the product
of the rounded activations (computed here in PyTorch) within the rounding term alone. That
term is a worst case, too loose to see one integer off by one at large K; the integer sums
are held exact by test_integer_sums_are_exact, whose data make every float operation exact
(integer activations with 127 in every q-block, so dx = 1; scales +-1, integer zeros;
every partial sum an integer below 2^24), so the result must equal the int64 product.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import pytest
import torch
from conftest import restore_cpu_kernel_defaults

from lutlm.formats.packed import SUPPORTED_BITS, PackedWeight, check_config, pack_planes
from lutlm.kernels import cpu, cpu_dequant, cpu_layout, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernel library is not built")

U = 2.0**-24
ISAS = [isa for isa in cpu.ISAS if cpu.ISAS.index(isa) <= cpu.ISAS.index(cpu.best_isa())] if cpu.available() else []
BITS = [1, 2, 3, 4, 5, 6, 7, 8]
WHOLE_ROW = 0  # group size placeholder: one group per row
# (rows, inputs) per group size: rows not a multiple of the 16-row tile, K with a padded
# K-step (48 with groups of 16: 64 inputs, the last group of 16 padding; 200 as one group).
SHAPES = {
    16: [(33, 48), (100, 576)],
    32: [(33, 96), (100, 1536)],
    64: [(33, 576), (100, 1536)],
    128: [(33, 1536), (100, 384)],
    WHOLE_ROW: [(33, 48), (100, 200)],
}
BATCHES = (1, 2, 5, 70)


@pytest.fixture(autouse=True)
def restore_kernel_settings():
    yield
    restore_cpu_kernel_defaults()


@lru_cache(maxsize=None)
def make_weight(n: int, k: int, group: int, bits: int, seed: int = 0) -> PackedWeight:
    """Random codes over the full range, positive and negative scales, zeros anywhere in the
    codes' range (llama.cpp's Q8_0 has zero 128, its K-quants fractional zeros)."""
    group = group or k
    g = torch.Generator().manual_seed(seed * 1000 + bits * 10 + group)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    scales = ((torch.rand(n, k // group, generator=g) - 0.3) * 0.05).half()
    zeros = (torch.rand(n, k // group, generator=g) * ((1 << bits) - 1)).half()
    return PackedWeight(pack_planes(codes, bits), scales, zeros, bits, group)


def activations(batch: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A few large channels, as real activations have: they set the int8 scales.
    return torch.randn(batch, k, generator=g) * (1 + 8 * (torch.rand(k, generator=g) > 0.98))


def per_input(t: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """A per-group tensor [N, groups] spread to [N, K]."""
    return t.float().repeat_interleave(w.group_size, dim=1)


def activation_scales(x: torch.Tensor, q_block: int) -> torch.Tensor:
    """dx per input [batch, K]: max|x| / 127 over its q-block (K padded with zeros)."""
    k = x.shape[1]
    k_pad = -(-k // q_block) * q_block
    blocks = torch.nn.functional.pad(x, (0, k_pad - k)).abs().view(x.shape[0], -1, q_block)
    return (blocks.amax(-1, keepdim=True) / 127).expand(-1, -1, q_block).reshape(x.shape[0], k_pad)[:, :k]


def rounded_activations(x: torch.Tensor, q_block: int) -> torch.Tensor:
    """x as the kernels round it: x * (127 / amax) rounded half to even, times amax / 127."""
    k = x.shape[1]
    k_pad = -(-k // q_block) * q_block
    blocks = torch.nn.functional.pad(x, (0, k_pad - k)).view(x.shape[0], -1, q_block)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127)).view(x.shape[0], k_pad)[:, :k]


def rounding_bound(x_abs: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """2 (K + 64) u M with M = sum_k |s| (q + |z|) x_abs (module docstring), [batch, N]."""
    reach = per_input(w.scales, w).abs() * (w.codes().float() + per_input(w.zeros, w).abs())  # [N, K]
    return 2 * (w.in_features + 64) * U * (x_abs @ reach.t())


def activation_bound(x: torch.Tensor, w: PackedWeight, q_block: int) -> torch.Tensor:
    """sum_k |w_k| dx_k / 2, [batch, N]."""
    return (activation_scales(x, q_block) / 2) @ w.dequantize().abs().t()


def int8_bound(x: torch.Tensor, w: PackedWeight, q_block: int) -> torch.Tensor:
    return activation_bound(x, w, q_block) + rounding_bound(x.abs() + activation_scales(x, q_block) / 2, w)


def check(y: torch.Tensor, y_ref: torch.Tensor, bound: torch.Tensor) -> None:
    err = (y - y_ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds its bound by {worst:.2f}x"


def cases():
    return [(n, k, group) for group, shapes in SHAPES.items() for n, k in shapes]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", list(SHAPES))
@pytest.mark.parametrize("bits", BITS)
def test_int8_within_activation_rounding_bound(bits, group, isa):
    cpu.set_isa(isa)
    for n, k in SHAPES[group]:
        w = make_weight(n, k, group, bits)
        h = cpu.prepare(w, kernel="dot")
        assert h.kernel == "dot" and h.c.kind == 2
        x = activations(max(BATCHES), k)
        w_ref = reference.prepare(w)
        y_ref = reference.matmul(x, w_ref)
        y_rounded = reference.matmul(rounded_activations(x, h.q_block), w_ref)
        bound = int8_bound(x, w, h.q_block)
        exact = rounding_bound(x.abs() + activation_scales(x, h.q_block) / 2, w)
        for batch in BATCHES:
            y = cpu.matmul(x[:batch], h)
            check(y, y_ref[:batch], bound[:batch])
            check(y, y_rounded[:batch], exact[:batch])  # the integer sums are exact
        check(cpu.matmul(x[:2], h, mode="fast"), y_rounded[:2], exact[:2])  # "fast" is the same path


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", list(SHAPES))
@pytest.mark.parametrize("bits", BITS)
def test_integer_sums_are_exact(bits, group, isa):
    # See the module docstring: scales +-1, |x| <= 63 but one 127 per q-block, so that no
    # sum exceeds K (2^8 - 1) 63 + 127 (2^8 - 1) K / 32 < 2^24 (K = 576).
    cpu.set_isa(isa)
    n, k = 37, 512 if group == 128 else 576
    g = torch.Generator().manual_seed(bits * 1000 + group)
    groups = 1 if group == WHOLE_ROW else k // group
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    scales = (1 - 2 * torch.randint(0, 2, (n, groups), generator=g)).half()
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=g).half()
    w = PackedWeight(pack_planes(codes, bits), scales, zeros, bits, group or k)
    h = cpu.prepare(w, kernel="dot")
    x = torch.randint(-63, 64, (5, k), generator=g)
    x.view(5, -1, h.q_block)[:, :, 0] = 127 * (1 - 2 * torch.randint(0, 2, (5, k // h.q_block), generator=g))
    expected = x.long() @ ((codes.long() - per_input(zeros, w).long()) * per_input(scales, w).long()).t()
    for batch in (1, 5):
        assert torch.equal(cpu.matmul(x[:batch].float(), h), expected[:batch].float())


@pytest.mark.parametrize("group", list(SHAPES))
@pytest.mark.parametrize("bits", BITS)
def test_float_mode_exact_up_to_rounding(bits, group):
    for n, k in SHAPES[group]:
        w = make_weight(n, k, group, bits)
        h = cpu.prepare(w, kernel="dot")
        x = activations(5, k)
        check(cpu.matmul(x, h, mode="float"), reference.matmul(x, reference.prepare(w)), rounding_bound(x.abs(), w))


@pytest.mark.parametrize("bits", [1, 3, 4, 6, 8])
@pytest.mark.parametrize("group", [16, 256, 384])
def test_threads_token_blocks_and_k_split(bits, group):
    # Threshold 0 sends these small products to the threads. 48 rows are 3 tiles, so one
    # token on 2 threads also splits K (at group 256, inside a group: two q-blocks of 128
    # each); 70 tokens span two token blocks (64 + 6); K = 2304 spans five K slices of the GEMM
    # (512 inputs: at group 384, slices start inside groups).
    # Same int8 activations and integer sums on every thread count: only float rounding differs.
    cpu.set_parallel_threshold(0)
    w = make_weight(48, 2304, group, bits)
    h = cpu.prepare(w, kernel="dot")
    x = activations(70, 2304)
    y_ref = reference.matmul(x, reference.prepare(w))
    bound = int8_bound(x, w, h.q_block)
    exact = rounding_bound(x.abs() + activation_scales(x, h.q_block) / 2, w)
    single = {}
    for threads in (1, 2):
        cpu.set_num_threads(threads)
        for batch in (1, 70):
            y = cpu.matmul(x[:batch], h)
            check(y, y_ref[:batch], bound[:batch])
            if threads == 1:
                single[batch] = y
            else:
                check(y, single[batch], exact[:batch])


@pytest.mark.parametrize("group", list(SHAPES))
@pytest.mark.parametrize("bits", BITS)
def test_layout_is_the_reference_statement_and_prepare_codes_matches(bits, group):
    # prepare (through the native converter) writes the bytes that cpu_layout.dot_codes and
    # tile_scales state in PyTorch; prepare_codes from one code per byte writes the same.
    for n, k in SHAPES[group]:
        w = make_weight(n, k, group, bits)
        h = cpu.prepare(w, kernel="dot")
        shape = cpu_layout.dot_shape(bits, w.group_size, k)
        assert (h.c.k_padded, h.c.group_size, h.c.q_block) == (shape.k_padded, shape.group_size, shape.q_block)
        assert torch.equal(h.codes, cpu_layout.dot_codes(w, shape))
        assert torch.equal(h.scales.view(torch.int16), cpu_layout.tile_scales(w, shape).view(torch.int16))
        direct = cpu.prepare_codes(w.codes(), w.scales, w.zeros, bits, w.group_size)
        assert torch.equal(direct.codes, h.codes) and torch.equal(direct.scales.view(torch.int16), h.scales.view(torch.int16))
        assert (direct.c.k_padded, direct.c.group_size, direct.c.q_block, direct.c.kind) == \
            (h.c.k_padded, h.c.group_size, h.c.q_block, h.c.kind)


@pytest.mark.parametrize("bits,group,ternary", [(1, 32, False), (2, 64, False), (3, 96, False), (4, 200, False),
                                                (2, 96, True)])
def test_prepare_codes_for_table_lookup_matches_prepare(bits, group, ternary):
    w = make_weight(33, 192 if group != 200 else 200, group, bits)
    if ternary:  # codes t + 1 with zeros 1
        w = PackedWeight(pack_planes(w.codes() % 3, 2), w.scales, torch.ones_like(w.zeros), 2, group, True)
    h = cpu.prepare(w, kernel="lut")
    direct = cpu.prepare_codes(w.codes(), w.scales, w.zeros, bits, group, kernel="lut", ternary=ternary)
    assert direct.kernel == "lut" and direct.ternary_tables == h.ternary_tables
    assert torch.equal(direct.codes, h.codes) and torch.equal(direct.scales.view(torch.int16), h.scales.view(torch.int16))


def test_prepare_codes_on_threads_equals_one_thread():
    # 1000 rows: 63 tiles over many tasks; codes of every value of 8 bits.
    w = make_weight(1000, 4096, 16, 8)
    codes = w.codes()
    cpu.set_num_threads(1)
    one = cpu.prepare_codes(codes, w.scales, w.zeros, 8, 16)
    cpu.set_num_threads(2)
    two = cpu.prepare_codes(codes, w.scales, w.zeros, 8, 16)
    assert torch.equal(one.codes, two.codes) and torch.equal(one.scales, two.scales)
    assert torch.equal(one.codes, cpu_layout.dot_codes(w, cpu_layout.dot_shape(8, 16, 4096)))


def test_default_kernel_and_supports():
    # Table lookup where it runs the weight, the dot kernels for 5..8 bits and groups of 16.
    assert cpu.prepare(make_weight(33, 96, 32, 4)).kernel == "lut"
    assert cpu.prepare(make_weight(33, 96, 96, 2)).kernel == "lut"
    assert cpu.prepare(make_weight(33, 96, 32, 5)).kernel == "dot"
    assert cpu.prepare(make_weight(33, 96, 16, 2)).kernel == "dot"
    assert cpu.supports(4, 32, 4096, "lut") and cpu.supports(4, 32, 4096, "dot") and cpu.supports(4, 32, 4096)
    assert cpu.supports(6, 16, 4096, "dot") and not cpu.supports(6, 16, 4096, "lut") and cpu.supports(6, 16, 4096)
    assert cpu.supports(8, 200, 200, "dot") and not cpu.supports(8, 200, 200, "lut")
    assert cpu.supports(2, 16, 4096, "dot") and not cpu.supports(2, 16, 4096, "lut")
    assert not cpu.supports(4, 48, 96) and not cpu.supports(9, 32, 96) and not cpu.supports(4, 64, 96)
    assert set(SUPPORTED_BITS) == set(BITS)
    # The dot-product GEMM of 4-bit table-lookup weights never takes a DOT weight.
    h = cpu.prepare(make_weight(33, 96, 32, 4), kernel="dot")
    assert not any(cpu.uses_dot_gemm(h, b) for b in (1, 4, 64, 1 << 20))


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_reference_backend_handles_wide_codes(bits):
    # reference.matmul and the table-lookup statement, against w = s (q - z) from the codes.
    w = make_weight(21, 64, 16, bits)
    q = w.codes().float()
    assert int(q.max()) == (1 << bits) - 1
    dense = per_input(w.scales, w) * (q - per_input(w.zeros, w))
    x = activations(3, 64)
    y = x @ dense.t()
    bound = rounding_bound(x.abs(), w)
    check(reference.matmul(x, reference.prepare(w)), y, bound)
    check(reference.lut_matmul_reference(x, w), y, bound)


def test_dequantize_baseline_runs_the_dot_layout():
    # The benchmark's baseline entry point: the dot kernels' int8 path, SIMD only.
    w = make_weight(33, 576, 64, 4)
    h, baseline = cpu.prepare(w, kernel="dot"), cpu_dequant.prepare(w)
    assert torch.equal(h.codes, baseline.codes)
    x = activations(3, 576)
    if cpu_dequant.available():  # one token: the same kernel; more: the same integer sums
        assert torch.equal(cpu_dequant.matmul(x[:1], baseline), cpu.matmul(x[:1], h))
        check(cpu_dequant.matmul(x, baseline), cpu.matmul(x, h), rounding_bound(x.abs() + activation_scales(x, 64), w))
    y = torch.empty(1, 33)
    cpu.set_isa("scalar")
    assert cpu.library().lutlm_dequant_matmul(ctypes.byref(h.c), x.data_ptr(), 1, y.data_ptr()) == -1
    assert cpu.library().lutlm_lut_matmul(ctypes.byref(h.c), x.data_ptr(), 1, y.data_ptr(), 0) == 0


def test_fast_decoder_runs_dot_weights():
    # fast_decode binds lutlm_lut_matmul once per linear: DOT weights (6 bits in groups of 16)
    # run through it unchanged; float mode agrees with model.forward up to rounding. Both are
    # float32 throughout: each logit is off by fp32 roundings (2^-24 each) amplified by the two
    # layers' sums over <= 96 inputs, about 2^-16 of the largest logit; 2^-12 leaves 16x to spare
    # (an elementwise tolerance fails on logits near zero, whose error is the large ones').
    from test_fast_decode import forward_then_fast, packed_checkpoint, tiny_config

    checkpoint = packed_checkpoint(tiny_config(), bits=6, group=16)
    expected, got = forward_then_fast(checkpoint)
    assert (got - expected).abs().max() <= 2**-12 * expected.abs().max()


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"bits=5 is not supported by the CPU table-lookup kernels \(1 to 4 bits\)"):
        cpu.prepare(make_weight(16, 96, 32, 5), kernel="lut")
    with pytest.raises(ValueError, match="group size 16 is not supported by the CPU kernels' table lookup.*groups of 16"):
        cpu.prepare(make_weight(16, 96, 16, 2), kernel="lut")
    with pytest.raises(ValueError, match="group size 48 is not supported by the CPU dot kernels: use 16, a multiple"):
        cpu.prepare(make_weight(16, 96, 48, 2), kernel="dot")
    with pytest.raises(ValueError, match="group size 48 is not supported by the CPU kernels"):
        cpu.prepare(make_weight(16, 96, 48, 6))
    with pytest.raises(ValueError, match="unknown kernel family 'gemm'"):
        cpu.prepare(make_weight(16, 96, 32, 2), kernel="gemm")
    with pytest.raises(ValueError, match="ternary table layout is a table-lookup layout"):
        cpu.prepare(make_weight(16, 96, 32, 2), ternary_tables=True, kernel="dot")
    with pytest.raises(ValueError, match="bits=9 is not supported: lutlm packs 1, 2, 3, 4, 5, 6, 7, 8 bits"):
        check_config(9, 32, 96)

    codes = torch.randint(0, 16, (16, 96), dtype=torch.uint8)
    scales, zeros = torch.ones(16, 3).half(), torch.zeros(16, 3).half()
    codes[3, 7] = 16
    with pytest.raises(ValueError, match="a code is 16, too large for 4 bits"):
        cpu.prepare_codes(codes, scales, zeros, 4, 32)
    with pytest.raises(ValueError, match="a code is 16, too large for 4 bits"):
        cpu.prepare_codes(codes, scales, zeros, 4, 32, kernel="lut")
    with pytest.raises(ValueError, match="bits=9 is not supported by the CPU dot kernels"):
        cpu.prepare_codes(codes, scales, zeros, 9, 32)
    with pytest.raises(ValueError, match=r"codes must be a uint8 \[N, K\] CPU tensor, got torch.int32"):
        cpu.prepare_codes(codes.int(), scales, zeros, 5, 32)
    with pytest.raises(ValueError, match=r"scales must be a float16 \[16, 3\] CPU tensor, got torch.float32"):
        cpu.prepare_codes(codes, scales.float(), zeros, 5, 32)
    with pytest.raises(ValueError, match=r"zeros must be a float16 \[16, 6\] CPU tensor"):
        cpu.prepare_codes(codes, torch.ones(16, 6).half(), zeros, 5, 16)
    with pytest.raises(ValueError, match="group size 40 does not divide in_features=96"):
        cpu.prepare_codes(codes, scales, zeros, 5, 40)
    with pytest.raises(ValueError, match="prepare_codes lays out the dot kernels' weights .* not 'lookup'"):
        cpu.prepare_codes(codes, scales, zeros, 5, 32, kernel="lookup")

    # The C entry points refuse what they cannot run, without touching memory.
    lib = cpu.library()
    out = ctypes.c_int64()
    assert lib.lutlm_dot_shape(16, 96, 4, 48, None, None, None, ctypes.byref(out), None) == -1
    assert lib.lutlm_dot_shape(16, 96, 9, 32, None, None, None, ctypes.byref(out), None) == -1
    assert lib.lutlm_dot_shape(16, 96, 8, 16, None, None, None, ctypes.byref(out), None) == 0 and out.value == 8 * 3 * 64
    assert lib.lutlm_pack_dot(None, None, None, 16, 96, 4, 32, None, None) == -1
    h = cpu.prepare(make_weight(16, 96, 16, 6), kernel="dot")
    x, y = torch.randn(1, 96), torch.empty(1, 16)
    for field, value in (("bits", 9), ("bits", 0), ("q_block", 64), ("group_size", 48), ("k_padded", 80)):
        bad = cpu._Weight.from_buffer_copy(h.c)
        setattr(bad, field, value)
        assert lib.lutlm_lut_matmul(ctypes.byref(bad), x.data_ptr(), 1, y.data_ptr(), 0) == -1, field
    assert lib.lutlm_lut_matmul(ctypes.byref(h.c), x.data_ptr(), 1, y.data_ptr(), 7) == -1  # no such mode


def test_gpu_backend_refuses_what_its_kernels_do_not_run():
    gpu = pytest.importorskip("lutlm.kernels.gpu")
    with pytest.raises(ValueError, match="the cuda backend runs 1 to 4 bits, not 6"):
        gpu.prepare(make_weight(16, 96, 32, 6))
    with pytest.raises(ValueError, match="multiple of 32, got 16"):
        gpu.prepare(make_weight(16, 96, 16, 4))
