"""The GPU dispatcher's tuning table: which kernel and tile configuration is fastest per
weight kind, shape and batch, measured on the device and stored as JSON in the package
(gpu_tuning.json).

`lutlm bench kernels --device cuda --tune` fills it: for each case it times every candidate
(``candidates``) with ``time_calls`` and keeps the fastest per kernel and overall
(``tune_case``). ``choose`` reads it: the nearest tuned shape of the same bits (another group
size counting as a small distance), then any weights, and a safe default when the table is empty.

Timing replays a CUDA graph of many launches and divides by their number, so that the gaps of
the Python launcher stay out; the launches cycle through enough copies of the weights to
overflow the L2 cache twice, so that every launch reads its weights from device memory as a
real model's layers do.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from lutlm.formats.packed import PackedWeight, pack_planes
from lutlm.kernels.gpu_dequant import DequantConfig
from lutlm.kernels.gpu_lut import LutConfig

TABLE_PATH = Path(__file__).with_name("gpu_tuning.json")
BATCHES = (1, 4, 16, 64, 256)


@dataclass(frozen=True)
class Plan:
    kernel: str  # "lut" or "dequant"
    config: DequantConfig | LutConfig

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "config": asdict(self.config)}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        config_type = {"lut": LutConfig, "dequant": DequantConfig}[d["kernel"]]
        return cls(d["kernel"], config_type(**d["config"]))


def weights_kind(bits: int, group: int) -> str:
    """The table's key for a weight format; ternary weights run as 2-bit codes and share it."""
    return f"{bits}bit-g{group}"


def default_plan(batch: int) -> Plan:
    """For an empty table: the dp4a GEMV for a few tokens, the tensor cores beyond."""
    if batch <= 4:
        return Plan("dequant", DequantConfig(block_n=64, block_m=1, block_k=256))
    if batch <= 16:
        return Plan("dequant", DequantConfig(block_n=128, block_m=16, block_k=64, num_stages=3))
    return Plan("dequant", DequantConfig(block_n=128, block_m=128, block_k=64, num_warps=8, num_stages=3))


def load_table(path: Path = TABLE_PATH) -> list[dict]:
    if not path.exists():
        return []
    return json.loads(path.read_text())["entries"]


GROUP_MISMATCH = 0.5  # in choose's shape distance: another group size counts as a shape e^0.5 = 1.65x off


def choose(entries: list[dict], kind: str, n: int, k: int, batch: int) -> Plan:
    """The tuned plan for the smallest tuned batch >= `batch` (else the largest), from the entry
    of the same bits (else of any weights) nearest in shape: the distance is |log| of the ratio
    of rows plus that of inputs, and GROUP_MISMATCH for another group size, since the best tile
    depends on the shape far more than on the group (a small model's g64 entries should not
    serve a 7B's g64 weights when a g128 entry of the 7B's shape exists)."""
    bits = kind.split("bit")[0]
    rows = [e for e in entries if e["weights"].split("bit")[0] == bits] or entries
    if not rows:
        return default_plan(batch)
    tuned_batches = sorted({e["batch"] for e in rows})
    bucket = next((b for b in tuned_batches if b >= batch), tuned_batches[-1])
    rows = [e for e in rows if e["batch"] == bucket]

    def distance(e: dict) -> float:
        return (abs(math.log(e["n"] / n)) + abs(math.log(e["k"] / k))
                + (0.0 if e["weights"] == kind else GROUP_MISMATCH))

    return Plan.from_dict(min(rows, key=distance)["best"])


def candidates(batch: int) -> list[Plan]:
    """The configurations worth timing for a batch size (each costs a compile)."""
    gemv = [Plan("dequant", DequantConfig(block_n=bn, block_m=1, block_k=bk, split_k=sk, num_warps=w))
            for bn, bk, sk, w in ((8, 4096, 1, 4), (16, 4096, 1, 4), (16, 1024, 1, 4), (16, 2048, 1, 8),
                                  (16, 1024, 4, 4), (8, 2048, 1, 4), (32, 1024, 1, 4), (32, 2048, 1, 8),
                                  (32, 4096, 1, 8), (64, 512, 1, 4), (64, 1024, 1, 8), (32, 1024, 4, 8))]
    lut = [Plan("lut", LutConfig(block_n=128, block_k=128, split_k=4))]
    # The tensor-core GEMM; the 256-token tiles dequantize each weight once per K step for the whole
    # batch (fastest on the 11008- to 28672-row shapes of an H200), and their split-K forms give the
    # narrow shapes (4096 or 8192 rows) enough programs to fill the chip.
    gemm = [Plan("dequant", DequantConfig(block_n=bn, block_m=bm, block_k=bk, split_k=sk, num_warps=w, num_stages=st))
            for bn, bm, bk, sk, w, st in ((64, 16, 128, 1, 4, 3), (128, 16, 64, 1, 4, 3), (64, 64, 64, 1, 4, 3),
                                          (128, 64, 64, 1, 4, 3), (128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3),
                                          (128, 256, 64, 1, 8, 4), (64, 256, 64, 1, 8, 3), (64, 256, 64, 2, 8, 3),
                                          (64, 256, 64, 4, 8, 3))]
    dense = [Plan("dequant", DequantConfig(block_n=32, block_m=0, block_k=128, dense=True))]
    if batch <= 4:
        return gemv + lut + (gemm[:2] if batch > 1 else [])
    if batch <= 16:
        return gemv[1:3] + gemm[:4] + dense
    return [p for p in gemm if batch // 2 <= p.config.block_m <= 2 * batch] + dense


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
    from lutlm.kernels import gpu

    first = gpu.prepare(random_weight(n, k, bits, group, ternary), with_lut=with_lut)
    copies = copies_to_defeat_cache(first.dequant.nbytes)
    return [first] + [gpu.prepare(random_weight(n, k, bits, group, ternary), with_lut=with_lut)
                      for _ in range(copies - 1)]


def time_plan(handles: list, x: torch.Tensor, plan: Plan, overlap: bool = False) -> tuple[float, float, float]:
    """Times of `plan` on x; overlap: launched with PDL, as the GPU decoder launches the dp4a GEMV
    (each launch still waits for the previous one to finish before it reads x)."""
    from lutlm.kernels import gpu

    return time_calls([lambda h=h: gpu.run_plan(x, h, plan, overlap=overlap) for h in handles])


def tune_case(handles: list, x: torch.Tensor) -> dict:
    """Time every candidate for this batch; the table entry with the fastest per kernel and overall.
    The dp4a GEMV is timed launched with PDL, the way the GPU decoder, its main user, runs it."""
    from triton.runtime.errors import OutOfResources

    from lutlm.kernels import gpu

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


def save_table(entries: list[dict], path: Path = TABLE_PATH) -> None:
    """Write the tuned entries, keeping the table's other entries: an entry replaces the one of
    the same weights, shape and batch, so that tuning a few batches or shapes leaves the rest."""
    def key(e: dict) -> tuple:
        return e["weights"], e["n"], e["k"], e["batch"]

    tuned = {key(e) for e in entries}
    entries = [e for e in load_table(path) if key(e) not in tuned] + entries
    table = {"device": torch.cuda.get_device_name(), "timing": "CUDA-graph replays, weights cycled past L2",
             "entries": entries}
    path.write_text(json.dumps(table, indent=1) + "\n")
