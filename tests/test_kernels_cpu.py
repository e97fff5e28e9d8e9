"""CPU table-lookup kernels against the plain references (lutlm/kernels/reference.py).

Error bounds, all per output element y[b, n]; u = 2^-24 is fp32's unit roundoff.

Magnitude. With mid = (2^bits - 1) / 2, every partial sum either side computes is at most
    M = sum_groups |s| (mid + |mid - z|) sum_{k in group} |x_k|
(|w| = |s| |q - z| <= |s| (mid + |mid - z|); a table entry is at most the sum of its
chunk's |x|). Summing n such terms in fp32 errs by at most n u M, and neither side
chains more than K + 64 additions (K for the dequantized matmul; K/4 per bit-plane, at
most K, plus the per-block epilogue for the kernels), so
    rounding:  |y - y_ref| <= 2 (K + 64) u M                                  (float tables)

int8 tables. A table block of Q inputs is rounded with unit = amax / 127, amax the largest
|entry| in the block (the largest sum of |x| over one chunk), so each lookup errs by at
most unit / 2. A row reads Q/4 chunks in each plane i with weight 2^i and scales the sum
by s / 2 (bit-planes), or Q/3 chunks with weight 1 scaled by s (ternary table):
    planes:   |err| <= sum_blocks |s| (unit / 2) (Q / 4) (2^bits - 1) / 2
    ternary:  |err| <= sum_blocks |s| (unit / 2) (Q / 3)
plus the rounding term. Fast aggregation replaces each pair of lookups a, b by twice their
rounded-down average, off from a + b by 1/2 after its mean correction, which adds half
the int8 term again: |err| <= 1.5 x int8 term + rounding.

int8 activations (the dequantize baseline, and the "int8" mode's dot-product GEMM for 4-bit
batches): each activation of a q-block is rounded with dx = max|x| / 127, off by at most
dx / 2; the zero point multiplies the sum of the rounded activations, so each rounding error
meets an exact q - z, |q - z| <= mid + |mid - z|:
    |err| <= sum_blocks |s| (dx / 2) (mid + |mid - z|) Q   plus the rounding term.
"""

from __future__ import annotations

import ctypes
import dataclasses
from functools import lru_cache

import pytest
import torch
from conftest import restore_cpu_kernel_defaults

from lutlm.formats.packed import PackedWeight
from lutlm.kernels import cpu, cpu_dequant, reference
from lutlm.quantize.rtn import quantize_rtn
from lutlm.quantize.ternary import quantize_ternary

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernel library is not built")

U = 2.0**-24
ISAS = [isa for isa in cpu.ISAS if cpu.ISAS.index(isa) <= cpu.ISAS.index(cpu.best_isa())] if cpu.available() else []
SIMD_ISAS = [isa for isa in ISAS if isa != "scalar"]
DEQUANT_ISAS = [isa for isa in SIMD_ISAS if isa in cpu_dequant.ISAS]  # the baseline has no portable version

# (rows, inputs, group size): odd row counts (not a multiple of the 16-row tile), every
# supported group size, whole rows whose length is not a multiple of 32, and SmolLM2's
# shapes (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536).
SHAPES = [
    (37, 256, 32),
    (37, 256, 64),
    (21, 384, 128),
    (19, 200, 200),
    (1, 96, 96),
    (576, 576, 64),
    (192, 576, 576),
    (1536, 576, 192),
    (576, 1536, 128),
]


@pytest.fixture(autouse=True)
def restore_kernel_settings():
    yield
    restore_cpu_kernel_defaults()


@lru_cache(maxsize=None)  # quantized once, shared by the tests' many modes and instruction sets
def make_weight(n: int, k: int, group: int, bits: int | str, seed: int = 0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g))
    if bits == "ternary":
        return quantize_ternary(w, None if group == k else group)
    return quantize_rtn(w, bits, group)


def activations(batch: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A few large channels, as real activations have: they set the table scales.
    return torch.randn(batch, k, generator=g) * (1 + 8 * (torch.rand(k, generator=g) > 0.98))


def mid_of(w: PackedWeight) -> float:
    return ((1 << w.bits) - 1) / 2


def rounding_bound(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    k, g = w.in_features, w.group_size
    mid = mid_of(w)
    ax = x.abs().view(x.shape[0], 1, k // g, g).sum(-1)  # [b, 1, groups]
    s, z = w.scales.float().abs(), w.zeros.float()
    m = (s * (mid + (mid - z).abs()) * ax).sum(-1)  # [b, n]
    return 2 * (k + 64) * U * m


def table_bound(x: torch.Tensor, w: PackedWeight, q_block: int, ternary_tables: bool) -> torch.Tensor:
    """The int8-table term of the module docstring, per output element."""
    k, g = w.in_features, w.group_size
    if ternary_tables:  # whole rows are padded to the ternary block with zeros
        k_pad = -(-k // q_block) * q_block
        x = torch.nn.functional.pad(x, (0, k_pad - k))
        chunk, per_lookup = 3, 1.0
    else:
        k_pad, chunk, per_lookup = -(-k // q_block) * q_block, 4, ((1 << w.bits) - 1) / 2
        x = torch.nn.functional.pad(x, (0, k_pad - k))
    blocks = x.abs().view(x.shape[0], k_pad // q_block, q_block // chunk, chunk).sum(-1)
    unit = blocks.amax(-1) / 127  # [b, blocks]
    group_of_block = torch.clamp(torch.arange(k_pad // q_block) * q_block // g, max=k // g - 1)
    s = w.scales.float().abs()[:, group_of_block]  # [n, blocks]
    lookups = q_block / chunk
    return (unit.unsqueeze(1) * s * 0.5 * lookups * per_lookup).sum(-1)


def check(y: torch.Tensor, y_ref: torch.Tensor, bound: torch.Tensor) -> None:
    err = (y - y_ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds its bound by {worst:.2f}x"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, "ternary"])
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_float_tables_equal_dequantized_product(n, k, group, bits):
    w = make_weight(n, k, group, bits)
    x = activations(3, k)
    y_ref = reference.matmul(x, reference.prepare(w))
    for ternary_tables in [False, True] if w.ternary and (group == k or group % 96 == 0) else [False]:
        y = cpu.matmul(x, cpu.prepare(w, ternary_tables), mode="float")
        check(y, y_ref, rounding_bound(x, w))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, "ternary"])
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_int8_tables_within_derived_bound(n, k, group, bits, isa):
    cpu.set_isa(isa)
    w = make_weight(n, k, group, bits)
    h = cpu.prepare(w)
    x = activations(2, k)
    y = cpu.matmul(x, h)
    y_ref = reference.matmul(x, reference.prepare(w))
    check(y, y_ref, table_bound(x, w, h.q_block, h.ternary_tables) + rounding_bound(x, w))
    if not h.ternary_tables:  # the same int8 tables, step by step in PyTorch: only rounding differs
        check(y, reference.lut_matmul_reference(x, w, h.q_block), rounding_bound(x, w))


@pytest.mark.parametrize("isa", SIMD_ISAS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, "ternary"])
def test_fast_aggregation_within_bound(bits, isa):
    cpu.set_isa(isa)
    n, k, group = 37, 576, 576 if bits == "ternary" else 64
    w = make_weight(n, k, group, bits)
    h = cpu.prepare(w)
    x = activations(3, k)
    y = cpu.matmul(x, h, mode="fast")
    y_ref = reference.matmul(x, reference.prepare(w))
    check(y, y_ref, 1.5 * table_bound(x, w, h.q_block, h.ternary_tables) + rounding_bound(x, w))


def activation_rounding_bound(x: torch.Tensor, w: PackedWeight, q_block: int) -> torch.Tensor:
    """The int8-activation term of the module docstring, per output element."""
    k, group = w.in_features, w.group_size
    k_pad = -(-k // q_block) * q_block
    blocks = torch.nn.functional.pad(x, (0, k_pad - k)).abs().view(x.shape[0], k_pad // q_block, q_block)
    dx = blocks.amax(-1) / 127
    group_of_block = torch.clamp(torch.arange(k_pad // q_block) * q_block // group, max=k // group - 1)
    s = w.scales.float().abs()[:, group_of_block]
    mid = mid_of(w)
    reach = mid + (mid - w.zeros.float()[:, group_of_block]).abs()  # the largest |q - z|
    return (dx.unsqueeze(1) * s * 0.5 * reach * q_block).sum(-1)


def rounded_activations(x: torch.Tensor, q_block: int) -> torch.Tensor:
    """x as the int8-activation kernels see it: rounded per q-block to multiples of max|x| / 127
    (fp32 arithmetic in the kernels' order: x * (127 / amax), round half to even, times amax / 127)."""
    k = x.shape[1]
    k_pad = -(-k // q_block) * q_block
    blocks = torch.nn.functional.pad(x, (0, k_pad - k)).view(x.shape[0], -1, q_block)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127)).view(x.shape[0], k_pad)[:, :k]


def int8_mode_bound(x: torch.Tensor, w: PackedWeight, h: cpu.LutWeight) -> torch.Tensor:
    """The "int8" mode's bound for this call: int8 activations where it runs the dot-product
    GEMM, int8 tables elsewhere."""
    if cpu.uses_dot_gemm(h, x.shape[0]):
        return activation_rounding_bound(x, w, h.q_block) + rounding_bound(x, w)
    return table_bound(x, w, h.q_block, h.ternary_tables) + rounding_bound(x, w)


HAS_DOT_GEMM = cpu.available() and cpu.uses_dot_gemm(cpu.prepare(make_weight(16, 32, 32, 4)), 1 << 20)


@pytest.mark.skipif(not HAS_DOT_GEMM, reason="the dot-product GEMM needs AVX-512 with GFNI")
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_dot_gemm_reproduces_the_dequantize_baseline(n, k, group):
    # Same int8 activations and integer sums as the baseline (which has its own layout):
    # only float rounding differs; and exactly the product of the rounded activations (the
    # zero point meets their sum, not that of the unrounded ones). Batches below, at and
    # above the 8 tokens of a pass.
    cpu.set_dot_gemm_min_tokens(2)
    w = make_weight(n, k, group, 4)
    h, baseline = cpu.prepare(w), cpu_dequant.prepare(w)
    x = activations(21, k)
    y_ref = reference.matmul(x, reference.prepare(w))
    y_rounded = reference.matmul(rounded_activations(x, h.q_block), reference.prepare(w))
    bound = activation_rounding_bound(x, w, h.q_block) + rounding_bound(x, w)
    for batch in (2, 8, 13, 21):
        assert cpu.uses_dot_gemm(h, batch)
        y = cpu.matmul(x[:batch], h)
        check(y, cpu_dequant.matmul(x[:batch], baseline), rounding_bound(x[:batch], w))
        check(y, y_rounded[:batch], rounding_bound(x[:batch], w))
        check(y, y_ref[:batch], bound[:batch])


@pytest.mark.skipif(not HAS_DOT_GEMM, reason="the dot-product GEMM needs AVX-512 with GFNI")
def test_dot_gemm_threads_token_blocks_and_threshold():
    # 130 tokens: three token blocks (64 + 64 + 2); K = 2304: five K slices, two q-blocks per
    # group (the group of a slice's first q-block is counted from its middle); 3 tiles on 2 threads.
    cpu.set_parallel_threshold(0)
    w = make_weight(45, 2304, 256, 4)
    h = cpu.prepare(w)
    x = activations(130, 2304)
    y_ref = reference.matmul(x, reference.prepare(w))
    bound = activation_rounding_bound(x, w, h.q_block) + rounding_bound(x, w)
    single = None
    for threads in (1, 2):
        cpu.set_num_threads(threads)
        y = cpu.matmul(x, h)
        check(y, y_ref, bound)
        if single is None:
            single = y
        else:
            check(y, single, rounding_bound(x, w))
    cpu.set_dot_gemm_min_tokens(200)  # above the batch: the table lookups again
    assert not cpu.uses_dot_gemm(h, 130)
    check(cpu.matmul(x, h), y_ref, table_bound(x, w, h.q_block, False) + rounding_bound(x, w))
    cpu.set_dot_gemm_min_tokens(1)  # clamped to 2: one token always uses the lookups
    assert not cpu.uses_dot_gemm(h, 1) and cpu.uses_dot_gemm(h, 2)
    assert not cpu.uses_dot_gemm(cpu.prepare(make_weight(45, 2304, 256, 2)), 130)  # 4 bits only
    cpu.set_isa("avx2")
    assert not cpu.uses_dot_gemm(h, 130)


@pytest.mark.skipif(not DEQUANT_ISAS, reason="the dequantize baseline needs AVX2 or AVX-512")
@pytest.mark.parametrize("isa", DEQUANT_ISAS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,group", [(37, 256, 32), (21, 384, 128), (19, 200, 200), (576, 1536, 128)])
def test_dequantize_baseline_within_activation_rounding_bound(n, k, group, bits, isa):
    cpu.set_isa(isa)
    assert cpu_dequant.available()
    w = make_weight(n, k, group, bits)
    q_block = cpu.prepare(w).q_block
    x = activations(3, k)
    y = cpu_dequant.matmul(x, cpu_dequant.prepare(w))
    check(y, reference.matmul(x, reference.prepare(w)), activation_rounding_bound(x, w, q_block) + rounding_bound(x, w))


@pytest.mark.skipif(not DEQUANT_ISAS, reason="the dequantize baseline needs AVX2 or AVX-512")
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_dequantize_baseline_threads_batches_and_instruction_sets(bits):
    # As test_threads_and_batches: one token on 2 threads splits K (18 q-blocks of 128, two
    # per group: the second part starts inside a group), 70 tokens span two token blocks.
    # The int8 activations and integer sums are the same on every instruction set and
    # thread count; only the order of float partial sums differs.
    cpu.set_parallel_threshold(0)
    w = make_weight(48, 2304, 256, bits)
    q_block = cpu.prepare(w).q_block
    assert q_block == 128
    h = cpu_dequant.prepare(w)
    x = activations(70, 2304)
    y_ref = reference.matmul(x, reference.prepare(w))
    bound = activation_rounding_bound(x, w, q_block) + rounding_bound(x, w)
    first = {}
    for isa in DEQUANT_ISAS:
        cpu.set_isa(isa)
        for threads in (1, 2):
            cpu.set_num_threads(threads)
            for batch in (1, 70):
                y = cpu_dequant.matmul(x[:batch], h)
                check(y, y_ref[:batch], bound[:batch])
                if batch in first:
                    check(y, first[batch], rounding_bound(x[:batch], w))
                else:
                    first[batch] = y


def test_dequantize_baseline_needs_simd():
    h = cpu_dequant.prepare(make_weight(16, 96, 32, 2))
    x, y = torch.randn(1, 96), torch.empty(1, 16)
    cpu.set_isa("scalar")
    assert not cpu_dequant.available()
    with pytest.raises(RuntimeError, match="needs AVX2 or AVX-512; the instruction set in use is scalar"):
        cpu_dequant.matmul(x, h)
    assert cpu.library().lutlm_dequant_matmul(ctypes.byref(h.c), x.data_ptr(), 1, y.data_ptr()) == -1


def test_instruction_sets_agree_on_int8_tables():
    # The int8 tables and integer sums are bit-identical across instruction sets; only the
    # float epilogue (fused or separate multiply-adds) rounds differently.
    cpu.set_dot_gemm_min_tokens(1 << 20)  # tables at every batch
    for bits in [1, 2, 3, 4, "ternary"]:
        w = make_weight(45, 384, 384 if bits == "ternary" else 128, bits)
        h = cpu.prepare(w)
        x = activations(4, 384)
        results = []
        for isa in ISAS:
            cpu.set_isa(isa)
            results.append(cpu.matmul(x, h))
        for y in results[1:]:
            check(y, results[0], rounding_bound(x, w))


@pytest.mark.parametrize("bits", [2, 4, "ternary"])
def test_threads_and_batches(bits):
    # Threshold 0 sends even these small products to the threads. 48 rows are 3 tiles, so
    # a one-token product on 2 threads also splits K; 70 tokens span two token blocks (64 + 6);
    # K = 2304 spans five K slices of the GEMM (512 inputs each).
    cpu.set_parallel_threshold(0)
    w = make_weight(48, 2304, 2304 if bits == "ternary" else 64, bits)
    h = cpu.prepare(w)
    x = activations(70, 2304)
    y_ref = reference.matmul(x, reference.prepare(w))
    single = {}
    for threads in (1, 2):
        cpu.set_num_threads(threads)
        assert cpu.get_num_threads() == threads
        for batch in (1, 70):
            y = cpu.matmul(x[:batch], h)
            check(y, y_ref[:batch], int8_mode_bound(x[:batch], w, h))
            if threads == 1:
                single[batch] = y
            else:  # same tables and integer sums; only the order of float partial sums differs
                check(y, single[batch], rounding_bound(x[:batch], w))


def test_pool_many_small_products_with_more_threads_than_cores():
    # Thousands of back-to-back jobs, each small enough that the caller often takes every
    # task before a worker wakes (the worker must then skip the job, not run a later one's
    # tasks with this one's arguments), on more threads than cores so that workers are
    # descheduled mid-job. The K split's partial sums are added in a fixed order, whichever
    # thread made them, so every result is bitwise the first.
    cpu.set_parallel_threshold(0)
    h = cpu.prepare(make_weight(48, 2304, 64, 2))
    x = activations(2, 2304)
    for threads in (2, 3, 5):
        cpu.set_num_threads(threads)
        first = [cpu.matmul(x[i : i + 1], h) for i in range(2)]
        for call in range(1500):
            i = call % 2
            assert torch.equal(cpu.matmul(x[i : i + 1], h), first[i]), (threads, call)


@pytest.mark.parametrize("bits", [2, 4, "ternary"])
def test_one_token_over_k_slices(bits):
    # K = 7680: a token's tables outgrow the GEMV's L1 budget (4-bit: 30 KiB, ternary: 40,
    # 2-bit: 90), so each tile is visited once per K slice, its groups cut at slice ends
    # (ternary: one group per row); the sums are the same, only float rounding differs.
    w = make_weight(40, 7680, 7680 if bits == "ternary" else 128, bits)
    h = cpu.prepare(w)
    x = activations(2, 7680)
    y = cpu.matmul(x[:1], h)
    check(y, reference.matmul(x[:1], reference.prepare(w)), int8_mode_bound(x[:1], w, h))
    cpu.set_dot_gemm_min_tokens(1 << 20)  # the same int8 tables in the GEMM, which slices K its own way
    check(y, cpu.matmul(x, h)[:1], rounding_bound(x[:1], w))


def test_leading_dimensions_and_dtype():
    w = make_weight(40, 128, 64, 2)
    h = cpu.prepare(w)
    x = activations(6, 128).view(2, 3, 128)
    y = cpu.matmul(x.to(torch.bfloat16), h)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    flat = cpu.matmul(x.to(torch.bfloat16).float().view(6, 128), h)
    assert torch.equal(y.view(6, 40), flat)
    assert cpu.matmul(torch.empty(0, 128), h).shape == (0, 40)


def test_real_layer_of_the_bundled_model(bundled):
    _, _, checkpoint = bundled
    dense = checkpoint.tensors["model.layers.3.mlp.down_proj.weight"]  # 576 x 1536
    x = activations(2, dense.shape[1])
    for bits in (2, 4):
        w = quantize_rtn(dense, bits, 128)
        h = cpu.prepare(w)
        y_ref = reference.matmul(x, reference.prepare(w))
        check(cpu.matmul(x, h), y_ref, int8_mode_bound(x, w, h))
        check(cpu.matmul(x, h, mode="float"), y_ref, rounding_bound(x, w))
        prompt = activations(40, dense.shape[1])  # a prefill: the dot-product GEMM at 4 bits
        check(cpu.matmul(prompt, h), reference.matmul(prompt, reference.prepare(w)), int8_mode_bound(prompt, w, h))


def test_bad_input_is_refused_with_a_clear_message():
    w = make_weight(16, 96, 48, 2)
    with pytest.raises(ValueError, match="group size 48 is not supported by the CPU kernels"):
        cpu.prepare(w)
    with pytest.raises(ValueError, match="ternary table layout needs a ternary weight"):
        cpu.prepare(make_weight(16, 96, 96, 2), ternary_tables=True)
    with pytest.raises(ValueError, match="multiple of 96, not 64"):
        cpu.prepare(make_weight(16, 128, 64, "ternary"), ternary_tables=True)
    h = cpu.prepare(make_weight(16, 96, 32, 2))
    with pytest.raises(ValueError, match=r"shape \(2, 64\): the last dimension must be 96"):
        cpu.matmul(torch.randn(2, 64), h)
    with pytest.raises(TypeError, match="floating-point"):
        cpu.matmul(torch.ones(2, 96, dtype=torch.int32), h)
    with pytest.raises(ValueError, match="unknown table mode 'int4'"):
        cpu.matmul(torch.randn(2, 96), h, mode="int4")
    with pytest.raises(ValueError, match="thread count must be at least 1"):
        cpu.set_num_threads(0)
    with pytest.raises(ValueError, match="unknown instruction set 'neon'"):
        cpu.set_isa("neon")


def test_fast_aggregation_needs_simd():
    h = cpu.prepare(make_weight(16, 96, 32, 2))
    cpu.set_isa("scalar")
    with pytest.raises(RuntimeError, match="rejected the call \\(mode 'fast' on scalar\\)"):
        cpu.matmul(torch.randn(1, 96), h, mode="fast")


PROMPTS = ["The capital of France is", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


@torch.inference_mode()
def greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens through model.forward, and the top-2 logit margin at each step."""
    model.setup_cache(1, len(ids) + n)
    logits = model(torch.tensor([ids]), 0)[0, -1]
    tokens, margins = [], []
    for i in range(n):
        top = logits.topk(2)
        tokens.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        logits = model(torch.tensor([[tokens[-1]]]), len(ids) + i)[0, -1]
    return tokens, margins


@pytest.fixture(scope="module")
def smollm2_4bit(bundled) -> dict[str, PackedWeight]:
    """Every linear of the bundled model, 4-bit min-max RTN with groups of 64."""
    from lutlm.quantize.grid import fit_minmax, grouped, quantize, to_packed

    packed = {}
    for name, w in bundled[2].tensors.items():
        if name.endswith("_proj.weight"):
            groups = grouped(w, 64)
            grid = fit_minmax(groups, 4, False)
            packed[name[: -len(".weight")]] = to_packed(quantize(groups, grid, 4), grid, 4)
    return packed


def top_two_planes(w: PackedWeight) -> PackedWeight:
    """A 2-bit weight from a 4-bit one without repacking: codes q >> 2 are its planes 2 and
    3, and s (q - z) ~ 4 s ((q >> 2) - z / 4)."""
    return PackedWeight(w.planes[2:].clone(), (w.scales.float() * 4).half(), (w.zeros.float() / 4).half(), 2,
                        w.group_size)


@pytest.mark.parametrize("bits", [2, 4])
def test_packed_smollm2_generates_the_reference_tokens(bundled, smollm2_4bit, bits, monkeypatch):
    """The packed model runs on these kernels by default. With float tables its greedy
    tokens are the reference path's. With int8 tables (the default) a token may differ
    only where the reference itself nearly ties: 4-bit divergences here happen at top-2
    margins of 0.02-0.03 logits (int8 tables move the logits by ~0.5 at most on this
    model; the 2-bit model is degenerate, so only its float tables are checked)."""
    from lutlm.loader import build_model

    _, tokenizer, checkpoint = bundled
    packed = smollm2_4bit if bits == 4 else {name: top_two_planes(w) for name, w in smollm2_4bit.items()}
    quantized = dataclasses.replace(checkpoint, packed=packed)
    reference_model = build_model(quantized, "reference")
    lut_model = build_model(quantized)
    kinds = {m.backend_name for m in lut_model.modules() if hasattr(m, "backend_name")}
    assert kinds == {"cpu"}, f"packed linears run on {kinds}, not the CPU table-lookup kernels"

    table_matmul = cpu.matmul
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer.encode(prompt)
        expected, margins = greedy(reference_model, ids, 8)
        if i == 0:  # the portable float-table kernel is slow: one prompt
            monkeypatch.setattr(cpu, "matmul", lambda x, h: table_matmul(x, h, mode="float"))
            assert greedy(lut_model, ids, 8)[0] == expected
            monkeypatch.setattr(cpu, "matmul", table_matmul)
        if bits == 4:
            got = greedy(lut_model, ids, 8)[0]
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
            assert first is None or margins[first] < 0.1, f"diverged at step {first}, margin {margins[first]:.3f}"
