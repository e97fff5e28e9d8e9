"""Timing the GPU kernels, for `lutlm bench kernels --device cuda` (and its --tune, which fills
lutlm/kernels/gpu_tuning.json) and `lutlm bench gpu-decode`.

Timing replays a CUDA graph of many launches and divides by their number, so that the gaps of
the Python launcher stay out; the launches cycle through enough copies of the weights to
overflow the L2 cache twice, so that every launch reads its weights from device memory as a
real model's layers do.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

import torch
from triton.runtime.errors import OutOfResources

from lutlm.formats.packed import PackedWeight, pack_planes
from lutlm.kernels import gpu
from lutlm.kernels.gpu_tuning import Plan, candidates


def time_calls(calls: list[Callable[[], object]], launches: int = 40, repeats: int = 15) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile microseconds per call, from CUDA-graph replays of
    `launches` calls cycling through `calls` (each sample: one replay's time / launches)."""
    for call in calls:  # compiles and first touches stay out of the graph
        call()
    torch.cuda.synchronize()
    launches = max(launches, len(calls))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            calls[i % len(calls)]()
    graph.replay()
    return time_replays(graph.replay, launches, repeats)


def time_replays(run: Callable[[], object], calls_per_run: int, repeats: int) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile microseconds per call of `run` (work already captured,
    launching `calls_per_run` calls), timed by CUDA events around each of `repeats` runs."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls_per_run)
    q = statistics.quantiles(samples, n=4)
    return statistics.median(samples), q[0], q[2]


def copies_to_defeat_cache(nbytes: int) -> int:
    """Enough copies of an operand that cycling through them overflows the L2 cache twice."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, math.ceil(2 * l2 / nbytes))


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    median, _, _ = time_calls([lambda: dst.copy_(src)], launches=5, repeats=10)
    return 2 * nbytes / (median * 1e-6)


def random_weight(n: int, k: int, bits: int, group: int, ternary: bool = False, device: str = "cuda") -> PackedWeight:
    """Random codes with scales of a real model's size (|w| up to about 0.05), for timing."""
    groups = k // group
    if ternary:
        planes = pack_planes(torch.randint(0, 3, (n, k), dtype=torch.uint8, device=device), 2)  # q = t + 1
        zeros = torch.ones(n, groups, device=device, dtype=torch.float16)
    else:
        planes = torch.randint(0, 256, (bits, n, k // 8), dtype=torch.uint8, device=device)
        zeros = (torch.rand(n, groups, device=device) + (2**bits - 2) / 2).half()
    scales = (torch.rand(n, groups, device=device) * 0.01 / 2**bits + 0.005 / 2**bits).half()
    return PackedWeight(planes=planes, scales=scales, zeros=zeros, bits=2 if ternary else bits,
                        group_size=group, ternary=ternary)


def random_handles(n: int, k: int, bits: int, group: int, with_lut: bool, ternary: bool = False) -> list:
    """Prepared random weights, as many copies as it takes to overflow the L2 cache."""
    first = gpu.prepare(random_weight(n, k, bits, group, ternary), with_lut=with_lut)
    copies = copies_to_defeat_cache(first.dequant.nbytes)
    return [first] + [gpu.prepare(random_weight(n, k, bits, group, ternary), with_lut=with_lut)
                      for _ in range(copies - 1)]


def time_plan(handles: list, x: torch.Tensor, plan: Plan, overlap: bool = False) -> tuple[float, float, float]:
    """Times of `plan` on x; overlap: launched with PDL, as the GPU decoder launches the dp4a GEMV
    (each launch still waits for the previous one to finish before it reads x)."""
    return time_calls([lambda h=h: gpu.run_plan(x, h, plan, overlap=overlap) for h in handles])


def tune_case(handles: list, x: torch.Tensor) -> dict:
    """Time every candidate for this batch; the table entry with the fastest per kernel and overall.
    The dp4a GEMV is timed launched with PDL, the way the GPU decoder, its main user, runs it."""
    h = handles[0]
    best: dict[str, tuple[tuple[float, float, float], Plan]] = {}
    for plan in candidates(x.shape[0]):
        if plan.kernel == "lut" and h.lut is None:
            continue
        try:
            timing = time_plan(handles, x, plan, overlap=gpu.is_gemv(plan))
        except OutOfResources:  # a tile too large for this kind's shared memory
            continue
        if plan.kernel not in best or timing[0] < best[plan.kernel][0][0]:
            best[plan.kernel] = (timing, plan)
    winner = min(best.values(), key=lambda t: t[0][0])[1]
    return {
        "weights": h.kind, "n": h.out_features, "k": h.in_features, "batch": x.shape[0],
        "best": winner.to_dict(),
        "per_kernel": {name: {"us": round(t[0], 2), "p25": round(t[1], 2), "p75": round(t[2], 2), **plan.to_dict()}
                       for name, (t, plan) in best.items()},
    }
