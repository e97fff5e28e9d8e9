"""The GPU dispatcher's tuning table: which kernel and tile configuration is fastest per
weight kind, shape and batch, measured on the device and stored as JSON in the package
(gpu_tuning.json).

``choose`` reads it at run time: the nearest tuned shape of the same bits (another group size
counting as a small distance), then any weights, and a safe default when the table is empty.
`lutlm bench kernels --device cuda --tune` fills it: it times every configuration of
``candidates`` (lutlm.bench.gpu_timing.tune_case) and writes the winners with ``save_table``.
The timing code lives in lutlm.bench so that the kernels never import the code that times them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

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
