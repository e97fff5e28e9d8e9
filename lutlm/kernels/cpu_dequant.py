"""The dequantize-then-multiply baseline on the CPU (csrc/dequant*.cpp), for benchmarks.

llama.cpp's method, written as well as we could for AVX-512 VNNI (vpdpbusd) and for AVX2
(vpmaddubsw + vpmaddwd): codes unpacked to bytes, activations quantized to int8 per block,
integer dot products. These are the "dot" kernel family (cpu.prepare(w, kernel="dot"),
which runs in models through cpu.matmul on every instruction set); this module times the
same weights through the baseline's own entry point, which runs on the instruction set in
use (cpu.get_isa(), which cpu.set_isa() lowers) and refuses the portable one, so that a
benchmark row of the baseline is always SIMD code.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from lutlm.formats.packed import PackedWeight
from lutlm.kernels import cpu


ISAS = ("avx2", "avx512")


def available() -> bool:
    """Whether the baseline runs with the instruction set in use (AVX2 or AVX-512)."""
    return cpu.available() and cpu.get_isa() in ISAS


@dataclass
class DequantWeight:
    codes: torch.Tensor
    scales: torch.Tensor
    c: cpu._Weight
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 2


def prepare(w: PackedWeight) -> DequantWeight:
    h = cpu.prepare(w, kernel="dot")  # the dot kernels' layout (csrc/lutlm.h)
    return DequantWeight(h.codes, h.scales, h.c, w.in_features, w.out_features)


def matmul(x: torch.Tensor, handle: DequantWeight) -> torch.Tensor:
    if not available():
        isa = cpu.get_isa() if cpu.available() else "none (library not built)"
        raise RuntimeError(f"the dequantize baseline needs AVX2 or AVX-512; the instruction set in use is {isa}")
    rows = cpu.as_rows(x, handle.in_features)
    y = torch.empty(rows.shape[0], handle.out_features, dtype=torch.float32)
    if rows.shape[0] and cpu.library().lutlm_dequant_matmul(ctypes.byref(handle.c), rows.data_ptr(), rows.shape[0], y.data_ptr()):
        raise RuntimeError("lutlm_dequant_matmul rejected the call")
    return y.view(*x.shape[:-1], handle.out_features)
