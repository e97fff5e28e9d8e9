"""The dequantize-then-multiply baseline on the CPU (csrc/dequant*.cpp), for benchmarks.

llama.cpp's method, written as well as we could for AVX-512 VNNI (vpdpbusd) and for AVX2
(vpmaddubsw + vpmaddwd): codes unpacked to bytes, activations quantized to int8 per block,
integer dot products. It runs on the instruction set in use (cpu.get_isa(), which
cpu.set_isa() lowers); there is no portable version. The benchmark sets it beside the
table-lookup kernels at the same bits; it is not a model backend.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from lutlm.formats.packed import PackedWeight
from lutlm.kernels import cpu
from lutlm.kernels.cpu_layout import dequant_codes, kernel_shape, tile_scales


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
    shape = kernel_shape(w, ternary_tables=False)
    codes, scales = dequant_codes(w, shape), tile_scales(w, shape)
    c = cpu.describe_weight(codes, scales, w, shape, 0)
    return DequantWeight(codes, scales, c, w.in_features, w.out_features)


def matmul(x: torch.Tensor, handle: DequantWeight) -> torch.Tensor:
    if not available():
        isa = cpu.get_isa() if cpu.available() else "none (library not built)"
        raise RuntimeError(f"the dequantize baseline needs AVX2 or AVX-512; the instruction set in use is {isa}")
    rows = cpu.as_rows(x, handle.in_features)
    y = torch.empty(rows.shape[0], handle.out_features, dtype=torch.float32)
    if rows.shape[0] and cpu.library().lutlm_dequant_matmul(ctypes.byref(handle.c), rows.data_ptr(), rows.shape[0], y.data_ptr()):
        raise RuntimeError("lutlm_dequant_matmul rejected the call")
    return y.view(*x.shape[:-1], handle.out_features)
