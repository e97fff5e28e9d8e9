"""The GPU kernels (gpu_dequant's GEMV and GEMM, gpu_lut) and the "cuda" backend's dispatcher,
against the reference (dequantize in fp64, then multiply).

Without a GPU the kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1) at
small shapes, so CI checks every kernel; with CUDA the same tests also run Llama-sized shapes.

Error bound. The kernels take fp16 activations and write fp16 outputs; in between:
  * the tensor-core GEMM forms w = (q - z) * s in fp16: two roundings, each at most 2^-11
    relative to s (|q| + |z|), so |dw| <= 2^-10 |s| (|q| + |z|);
  * the CUDA-core GEMV and the table-lookup kernel keep codes exact and sum in fp32; the
    magic-number floats 1 + q / 2^b are exact, and the cancellation in 2^b (sum v x - sum x)
    costs at most a few ulps of 2^b sum |x| per group, far below the GEMM's term;
  * fp32 accumulation over K <= 2^14 terms adds at most K 2^-24 <= 2^-10 relative to sum |w x|;
  * split-K GEMV programs add their partial sums atomically into the fp16 output, each addition
    rounding by at most 2^-11 of sum |w x|: 2^-10 for the split of 2 tested here (K-splits of
    the tensor-core GEMM add in fp32);
  * the fp16 output rounds once more: 2^-11 |y|.
So |y - ref| <= 2^-9 sum_k |s| (|q| + |z|) |x_k| + 2^-10 |ref|, asserted below (with a tiny
absolute floor for exact zeros).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # tests/conftest.py sets it too, before anything imports Triton
triton = pytest.importorskip("triton")

from lutlm.formats.packed import PackedWeight, pack_planes  # noqa: E402
from lutlm.kernels import gpu, gpu_dequant, gpu_lut, gpu_tuning  # noqa: E402
from lutlm.kernels.gpu_dequant import DequantConfig  # noqa: E402
from lutlm.kernels.gpu_lut import LutConfig  # noqa: E402
from lutlm.kernels.gpu_tuning import Plan  # noqa: E402
from lutlm.linear import PackedLinear  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = gpu.device()

GEMV = Plan("dequant", DequantConfig(block_n=16, block_m=1, block_k=256))
GEMV_SPLIT = Plan("dequant", DequantConfig(block_n=8, block_m=1, block_k=64, split_k=2))
GEMM = Plan("dequant", DequantConfig(block_n=32, block_m=16, block_k=32))
GEMM_SPLIT = Plan("dequant", DequantConfig(block_n=16, block_m=32, block_k=128, split_k=3))
DENSE = Plan("dequant", DequantConfig(block_n=16, block_m=0, block_k=64, dense=True))
LUT = Plan("lut", LutConfig(block_n=16, block_k=128))
LUT_SPLIT = Plan("lut", LutConfig(block_n=32, block_k=256, split_k=2))
PLANS = {"gemv": GEMV, "gemv_split": GEMV_SPLIT, "gemm": GEMM, "gemm_split": GEMM_SPLIT, "dense": DENSE, "lut": LUT, "lut_split": LUT_SPLIT}


def random_packed(n: int, k: int, bits: int, group: int, ternary: bool = False, seed: int = 0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 3 if ternary else 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=g) * 0.05 + 0.001).half()
    if ternary:
        zeros = torch.ones(n, k // group, dtype=torch.float16)
    else:
        zeros = (torch.rand(n, k // group, generator=g) * (2**bits - 1)).half()
    return PackedWeight(pack_planes(codes, bits), scales, zeros, bits, group, ternary)


def check_close(y: torch.Tensor, x: torch.Tensor, w: PackedWeight, activation_group: int | None = None) -> None:
    """The bound derived in gpu_dequant's docstring: fp16 rounding of the dequantized weights and of
    the output, plus, for the dp4a GEMV (`activation_group`), the int8 rounding of each activation,
    at most amax(its group) / 254."""
    n, k = w.out_features, w.in_features
    dev = y.device  # fp64 on the GPU where there is one: Llama-sized references are slow on the CPU
    q = w.codes().to(dev).double().view(n, k // w.group_size, w.group_size)
    s = w.scales.to(dev).double().unsqueeze(-1)
    z = w.zeros.to(dev).double().unsqueeze(-1)
    dense = (s * (q - z)).view(n, k)
    magnitude = (s.abs() * (q + z.abs())).view(n, k)
    xd = x.to(dev).double()
    ref = xd @ dense.t()
    bound = 2**-9 * (xd.abs() @ magnitude.t()) + 2**-10 * ref.abs() + 1e-6
    if activation_group:
        padded = torch.nn.functional.pad(xd.abs(), (0, -k % activation_group))
        amax = padded.view(xd.shape[0], -1, activation_group).amax(-1).repeat_interleave(activation_group, 1)[:, :k]
        bound += (amax / 254) @ dense.abs().t()
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error exceeds the bound by {worst:.2f}x (max abs error {err.max().item():.3g})"


def run(w: PackedWeight, plan: Plan, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's output, its input, and the bound's activation group (dp4a GEMV only)."""
    handle = gpu.prepare(w, with_lut=True)
    x = torch.randn(batch, w.in_features, generator=torch.Generator().manual_seed(seed)).half().to(DEVICE)
    gemv = plan.kernel == "dequant" and plan.config.block_m == 1
    return gpu.run_plan(x, handle, plan), x, handle.dequant.group if gemv else None


# Odd sizes on purpose: N not a multiple of any tile, K not a multiple of a whole K step.
SMALL = [(40, 576), (24, 320)]


@pytest.mark.parametrize("kernel", list(PLANS))
@pytest.mark.parametrize("bits,ternary", [(1, False), (2, False), (3, False), (4, False), (2, True)])
def test_kernels_match_reference(kernel, bits, ternary):
    n, k = SMALL[bits % 2]
    group = 64 if k % 64 == 0 else 32
    w = random_packed(n, k, bits, group, ternary, seed=bits)
    plan = PLANS[kernel]
    y, x, activation_group = run(w, plan, batch=3)
    check_close(y, x, w, activation_group)


@pytest.mark.parametrize("bits", [3, 4])
def test_views_of_stacked_rows(bits):
    """Every kernel on views of some rows of a stacked handle (scales and planes strided by the
    stacked row count, as the GPU decoder leaves the model's q/k/v and gate/up) gives the same
    outputs as on the parts' own layouts."""
    parts = [random_packed(n, 320, bits, 64, seed=i) for i, n in enumerate((24, 40, 8))]
    handles = [gpu.prepare(w, with_lut=True) for w in parts]
    stacked = gpu.stack(handles)
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(5)).half().to(DEVICE)
    start = 0
    for w, handle in zip(parts, handles):
        view = stacked.rows(start, start + w.out_features)
        assert view.dequant.scales.stride(0) == view.lut.scales.stride(0) == 72
        for plan in PLANS.values():  # split-K programs add in any order on a GPU: an fp16 ulp apart at most
            torch.testing.assert_close(gpu.run_plan(x, view, plan), gpu.run_plan(x, handle, plan), rtol=1e-3,
                                       atol=1e-4)
        start += w.out_features
    with pytest.raises(ValueError, match="only weights of one kind stack"):
        gpu.stack([handles[0], gpu.prepare(random_packed(8, 320, 2, 64))])


@pytest.mark.parametrize("bits,ternary", [(1, False), (2, False), (3, False), (4, False), (2, True)])
def test_gemm_whole_tiles(bits, ternary):
    """Shapes that are whole tiles, where the tensor-core GEMM drops its masks (EVEN_N/M/K), with a
    tile wider than the batch-16 ones above and one K step per group, split over K and not."""
    w = random_packed(64, 256, bits, 128, ternary, seed=bits)
    for plan in (Plan("dequant", DequantConfig(block_n=32, block_m=32, block_k=64)),
                 Plan("dequant", DequantConfig(block_n=64, block_m=32, block_k=128, split_k=2))):
        y, x, _ = run(w, plan, batch=32)
        check_close(y, x, w)


@pytest.mark.parametrize("plan", [GEMV, GEMV_SPLIT], ids=["gemv", "gemv_split"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_takes_gated_activations(plan, bits):
    """gated: the GEMV reads [gate | up] and multiplies SiLU(gate) * up, unrounded; overlap (PDL
    where the GPU has it) changes nothing in the result."""
    n, k = SMALL[0]
    w = random_packed(n, k, bits, 64, seed=bits)
    handle = gpu.prepare(w)
    gate_up = (torch.randn(2, 2 * k, generator=torch.Generator().manual_seed(5)) * 2).half().to(DEVICE)
    y = gpu.run_plan(gate_up, handle, plan, gated=True, overlap=True)
    gate, up = gate_up.float().chunk(2, dim=-1)
    check_close(y, torch.nn.functional.silu(gate) * up, w, handle.dequant.group)


def test_gated_matmul_on_any_plan():
    """The dispatcher gates first for kernels that cannot take gated activations."""
    w = random_packed(40, 576, 4, 64)
    handle = gpu.prepare(w, with_lut=True)
    gate_up = torch.randn(3, 2 * 576, generator=torch.Generator().manual_seed(6)).half().to(DEVICE)
    act = torch.nn.functional.silu(gate_up[:, :576]) * gate_up[:, 576:]
    for plan in (GEMM, LUT):
        handle.plans[3] = plan
        check_close(gpu.matmul(gate_up, handle, gated=True, overlap=True), act, w)
    with pytest.raises(ValueError, match="dp4a GEMV's"):
        gpu.run_plan(gate_up, handle, GEMM, gated=True)


@pytest.mark.parametrize("group", [64, 128, 96, 576])
def test_group_sizes(group):
    """Powers of two run as they are; 96 and a whole row (576) as repeated groups of 32 or 64."""
    k = 576 if group != 128 else 512
    w = random_packed(24, k, 2, group, seed=group)
    handle = gpu.prepare(w)
    assert handle.dequant.group == gpu_dequant.kernel_group(group)
    for plan in (GEMV, GEMM):
        y, x, activation_group = run(w, plan, batch=2)
        check_close(y, x, w, activation_group)


@pytest.mark.skipif(not CUDA, reason="Llama-sized shapes need a GPU")
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_llama_shapes_on_gpu(shape, bits):
    w = random_packed(*shape, bits, 128, seed=bits)
    for batch in (1, 16, 256):
        for plan in gpu_tuning.candidates(batch)[:2] + [gpu_tuning.default_plan(batch)]:
            y, x, activation_group = run(w, plan, batch)
            check_close(y, x, w, activation_group)


def test_backend_matmul_keeps_shape_and_dtype():
    w = random_packed(40, 576, 4, 64)
    layer = PackedLinear(w, backend="cuda")
    x = torch.randn(2, 3, 576).to(DEVICE)
    y = layer(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    check_close(y.reshape(6, 40), x.reshape(6, 576).half(), w)
    assert layer(x[:, :0]).shape == (2, 0, 40)


def test_dispatcher_reads_the_table():
    entry = {"weights": "4bit-g128", "n": 4096, "k": 4096, "batch": 1,
             "best": Plan("lut", LutConfig(block_n=64)).to_dict()}
    far = {"weights": "4bit-g128", "n": 28672, "k": 8192, "batch": 1, "best": GEMV.to_dict()}
    wide = {"weights": "4bit-g128", "n": 4096, "k": 4096, "batch": 256, "best": GEMM.to_dict()}
    table = [entry, far, wide]
    assert gpu_tuning.choose(table, "4bit-g128", 4096, 4096, 1) == Plan.from_dict(entry["best"])
    assert gpu_tuning.choose(table, "4bit-g128", 11008, 4096, 1) == Plan.from_dict(entry["best"])  # nearest shape
    assert gpu_tuning.choose(table, "4bit-g128", 24576, 8192, 1) == GEMV
    assert gpu_tuning.choose(table, "4bit-g128", 4096, 4096, 2) == GEMM  # next tuned batch up
    assert gpu_tuning.choose(table, "4bit-g128", 4096, 4096, 999) == GEMM  # beyond: the largest
    assert gpu_tuning.choose(table, "4bit-g64", 4096, 4096, 1) == Plan.from_dict(entry["best"])  # same bits
    assert gpu_tuning.choose(table, "2bit-g128", 4096, 4096, 1) == Plan.from_dict(entry["best"])  # other bits
    assert gpu_tuning.choose([], "2bit-g128", 4096, 4096, 300) == gpu_tuning.default_plan(300)
    small_plan = Plan("dequant", DequantConfig(block_n=8, block_m=1, block_k=512))
    small = {"weights": "4bit-g64", "n": 576, "k": 576, "batch": 1, "best": small_plan.to_dict()}
    assert gpu_tuning.choose(table + [small], "4bit-g64", 960, 576, 1) == small_plan  # same group, near shape
    assert gpu_tuning.choose(table + [small], "4bit-g64", 4096, 4096, 1) == Plan.from_dict(entry["best"])  # shape wins


def test_tuning_replaces_only_the_entries_it_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "test device")
    path = tmp_path / "table.json"
    gpu_tuning.save_table([{"weights": "4bit-g128", "n": 4096, "k": 4096, "batch": b, "best": GEMV.to_dict()}
                           for b in (1, 4)], path)
    gpu_tuning.save_table([{"weights": "4bit-g128", "n": 4096, "k": 4096, "batch": 4, "best": GEMM.to_dict()}], path)
    table = gpu_tuning.load_table(path)
    assert len(table) == 2
    assert gpu_tuning.choose(table, "4bit-g128", 4096, 4096, 1) == GEMV
    assert gpu_tuning.choose(table, "4bit-g128", 4096, 4096, 3) == GEMM


def test_lut_layout_only_when_routed():
    w = random_packed(24, 320, 2, 64)
    assert gpu.prepare(w, with_lut=False).lut is None
    assert gpu.prepare(w, with_lut=True).lut is not None


def test_plans_round_trip_through_json():
    for plan in PLANS.values():
        assert Plan.from_dict(plan.to_dict()) == plan


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        gpu.prepare(random_packed(8, 64, 2, 16))
    with pytest.raises(ValueError, match="in_features to be a multiple of 32"):
        gpu.prepare(random_packed(8, 40, 2, 8))
    handle = gpu.prepare(random_packed(8, 64, 2, 32))
    with pytest.raises(ValueError, match="input has 32 features, the weight expects 64"):
        gpu.matmul(torch.zeros(1, 32).to(DEVICE), handle)
    x = torch.zeros(1, 64, dtype=torch.float16).to(DEVICE)
    with pytest.raises(ValueError, match="without the table-lookup layout"):
        gpu.run_plan(x, handle, LUT)
    with pytest.raises(ValueError, match="block_m=8"):
        gpu.run_plan(x, handle, Plan("dequant", DequantConfig(block_n=16, block_m=8)))
    with pytest.raises(ValueError, match="block_k=16"):
        gpu.run_plan(x, handle, Plan("dequant", DequantConfig(block_n=16, block_m=16, block_k=16)))
    lut_handle = gpu.prepare(random_packed(8, 128, 2, 128), with_lut=True)
    with pytest.raises(ValueError, match="block_k=64"):
        gpu_lut.matmul(torch.zeros(1, 128, dtype=torch.float16).to(DEVICE), lut_handle.lut, LutConfig(16, block_k=64))
