"""The dequantize-then-multiply baseline on the CPU (csrc/dequant_avx512.cpp), for benchmarks.

llama.cpp's method, written as well as we could for AVX-512 VNNI: codes unpacked to bytes,
activations quantized to int8 per block, vpdpbusd dot products. The benchmark sets it
beside the table-lookup kernels at the same bits; it is not a model backend.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from lutlm.formats.packed import PackedWeight
from lutlm.kernels import cpu
from lutlm.kernels.cpu_layout import dequant_codes, kernel_shape, tile_scales


def available() -> bool:
    return cpu.available() and cpu.best_isa() == "avx512"


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
        raise RuntimeError("the dequantize baseline needs AVX-512 VNNI")
    rows = cpu.as_rows(x, handle.in_features)
    y = torch.empty(rows.shape[0], handle.out_features, dtype=torch.float32)
    if rows.shape[0] and cpu.library().lutlm_dequant_matmul(ctypes.byref(handle.c), rows.data_ptr(), rows.shape[0], y.data_ptr()):
        raise RuntimeError("lutlm_dequant_matmul rejected the call")
    return y.view(*x.shape[:-1], handle.out_features)
