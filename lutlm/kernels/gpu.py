"""The "cuda" kernel backend: packed weights in GPU layouts, and the dispatcher that sends each
product to the table-lookup kernel (gpu_lut) or the dequantizing kernel (gpu_dequant),
whichever the tuning table (gpu_tuning) measured faster for the weight's shape and the batch.

Without a GPU the same kernels run on the CPU through Triton's interpreter
(TRITON_INTERPRET=1), which is how the tests check them in CI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lutlm.formats.packed import PackedWeight
from lutlm.kernels import gpu_dequant, gpu_lut, gpu_tuning, interpreter_enabled
from lutlm.kernels.gpu_tuning import Plan


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreter_enabled()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class GpuHandle:
    dequant: gpu_dequant.DequantLayout
    lut: gpu_lut.LutLayout | None
    kind: str  # the tuning table's weight kind, e.g. "4bit-g128"
    plans: dict[int, Plan] = field(default_factory=dict)  # by batch size, filled on first use

    @property
    def in_features(self) -> int:
        return self.dequant.in_features

    @property
    def out_features(self) -> int:
        return self.dequant.out_features

    def rows(self, start: int, stop: int) -> "GpuHandle":
        """The handle of rows start .. stop - 1, as views of this one's memory (its own plans)."""
        return GpuHandle(dequant=self.dequant.rows(start, stop),
                         lut=None if self.lut is None else self.lut.rows(start, stop), kind=self.kind)


def stack(handles: list[GpuHandle]) -> GpuHandle:
    """One handle whose rows are those of `handles` one after another (same input, same weight
    kind); it has the table-lookup layout if every part has one."""
    if any(h.kind != handles[0].kind for h in handles):
        raise ValueError(f"only weights of one kind stack, not {', '.join(h.kind for h in handles)}")
    luts = [h.lut for h in handles]
    return GpuHandle(dequant=gpu_dequant.stack([h.dequant for h in handles]),
                     lut=None if None in luts else gpu_lut.stack(luts), kind=handles[0].kind)


_TABLE: list[dict] | None = None


def tuning_table() -> list[dict]:
    global _TABLE
    if _TABLE is None:
        _TABLE = gpu_tuning.load_table()
    return _TABLE


def plan_for(handle: GpuHandle, batch: int) -> Plan:
    plan = handle.plans.get(batch)
    if plan is None:
        plan = gpu_tuning.choose(tuning_table(), handle.kind, handle.out_features, handle.in_features, batch)
        if plan.kernel == "lut" and handle.lut is None:
            plan = gpu_tuning.default_plan(batch)
        handle.plans[batch] = plan
    return plan


def prepare(w: PackedWeight, with_lut: bool | None = None) -> GpuHandle:
    """Move a packed weight to the GPU in the dequantizing kernel's layout and, when the tuning
    table routes some batch of this shape to it (or `with_lut`), the table-lookup kernel's too."""
    # The packed format also holds 5..8 bits and groups of 16 (the CPU dot kernels run them);
    # the GPU kernels' layouts do not, and would not fail on their own before computing.
    if w.bits > 4:
        raise ValueError(f"the cuda backend runs 1 to 4 bits, not {w.bits} (the CPU dot kernels run up to 8)")
    if w.in_features % 32:
        raise ValueError(f"the cuda backend needs in_features to be a multiple of 32, got {w.in_features}")
    if w.group_size % 32:
        raise ValueError(f"the cuda backend needs a group size that is a multiple of 32, got {w.group_size}")
    dev = device()
    planes = w.planes.to(dev)
    scales, zeros = w.scales.to(dev), w.zeros.to(dev)
    dequant = gpu_dequant.pack(PackedWeight(planes, scales, zeros, w.bits, w.group_size, w.ternary).codes(),
                               w.bits, scales, zeros, w.group_size)
    kind = gpu_tuning.weights_kind(w.bits, dequant.group)
    if with_lut is None:
        with_lut = any(
            gpu_tuning.choose(tuning_table(), kind, w.out_features, w.in_features, b).kernel == "lut"
            for b in gpu_tuning.BATCHES
        )
    lut = gpu_lut.pack(planes, scales, zeros, w.group_size) if with_lut else None
    return GpuHandle(dequant=dequant, lut=lut, kind=kind)


def is_gemv(plan: Plan) -> bool:
    """Whether the plan runs the dp4a GEMV (the kernel that takes gated activations and PDL)."""
    return plan.kernel == "dequant" and gpu_dequant.is_gemv(plan.config)


def run_plan(x: torch.Tensor, handle: GpuHandle, plan: Plan, gated: bool = False,
             overlap: bool = False) -> torch.Tensor:
    """x fp16 [M, K] -> y fp16 [M, N] with the given kernel and configuration (gated, overlap:
    the dp4a GEMV's options, gpu_dequant.matmul)."""
    if plan.kernel == "lut":
        if handle.lut is None:
            raise ValueError("this weight was prepared without the table-lookup layout")
        if gated or overlap:
            raise ValueError("the table-lookup kernel takes neither gated activations nor launch overlap")
        return gpu_lut.matmul(x, handle.lut, plan.config)
    return gpu_dequant.matmul(x, handle.dequant, plan.config, gated, overlap)


def matmul(x: torch.Tensor, handle: GpuHandle, gated: bool = False, overlap: bool = False) -> torch.Tensor:
    """x [..., K] (any float dtype, on the weight's device) -> y [..., N] in x's dtype.

    gated: x is [..., 2K], gate then up, and the product is of SiLU(gate) * up (fused into the
    dp4a GEMV, computed first for the other kernels). overlap: let the dp4a GEMV start before
    the previous kernel has finished (gpu_dequant.matmul; the other kernels launch as usual)."""
    k = handle.in_features
    width = 2 * k if gated else k
    if x.shape[-1] != width:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {width}")
    if x.device != handle.dequant.scales.device:
        raise ValueError(f"input is on {x.device}, the weight on {handle.dequant.scales.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, width).to(torch.float16).contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*lead, handle.out_features)
    plan = plan_for(handle, x2.shape[0])
    gemv = is_gemv(plan)
    if gated and not gemv:
        x2 = torch.nn.functional.silu(x2[:, :k]) * x2[:, k:]
    y = run_plan(x2, handle, plan, gated and gemv, overlap and gemv)
    return y.view(*lead, handle.out_features).to(x.dtype)
