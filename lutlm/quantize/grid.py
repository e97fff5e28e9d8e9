"""Uniform quantization grids: one scale and zero point per group, and rounding to codes.

A b-bit group of G weights w is stored as codes q in 0 .. 2^b - 1 with one fp16 scale s
and one fp16 zero z in code units (lutlm.formats.packed): w ~ s * (q - z).

    asymmetric: the grid spans [lo, hi]:  s = (hi - lo) / (2^b - 1),  z = -lo / s
                (z is not rounded to an integer: the format stores it in fp16).
    symmetric:  z = (2^b - 1) / 2 and s = max|w| / z, a grid symmetric about 0; the
                table-lookup kernels' zero-point term ((2^b - 1) / 2 - z) then vanishes.

[lo, hi] (or max|w|) is the group's range shrunk by a clip ratio; `fit_clipped` picks the
ratio per group that minimizes an error measure (plain squared error by default, as in
GPTQ's `mse` option and llama.cpp's scale search; AWQ passes an activation-weighted one).
A grid need not span any range: `refine_least_squares` then alternates rounding with a
least-squares fit of scale and offset to the codes, as llama.cpp's k-quants do
(make_qkx2_quants), keeping a group's new grid only where it lowers the error.
Codes are always rounded against the fp16-rounded s and z, the values actually stored,
so what a quantizer minimizes is exactly what the kernels compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lutlm.formats.packed import PackedWeight, pack_planes

# Shrink ratios tried per group: 1 (the full range) down to 0.25 in steps of 0.05, then
# half a step either side of each group's best. The low end matters at 1-2 bits, where the
# squared-error optimum clips most of a Gaussian group's tails.
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(16))
CLIP_REFINE = 0.025

# The fp16 scale floor keeps tiny or constant groups finite (fp16 flushes below 2^-24) and,
# with the floor max|w| / 2048 below, bounds |z| <= 2048, well inside fp16's range.
MIN_SCALE = 2.0**-20
MAX_ZERO = 2048.0


@dataclass
class Grid:
    """Per-group scale and zero, float32 tensors shaped [..., 1] that hold fp16 values."""

    scale: torch.Tensor
    zero: torch.Tensor


def top_code(bits: int) -> int:
    return (1 << bits) - 1


def as_fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def group_range(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (lo, hi) over the last dimension: [-max|w|, max|w|] when symmetric."""
    if symmetric:
        absmax = w.abs().amax(-1, keepdim=True)
        return -absmax, absmax
    return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)


def grid_for_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                   ratio: float | torch.Tensor = 1.0) -> Grid:
    """The grid spanning [lo, hi] shrunk by `ratio` (a number, or one per group)."""
    top = top_code(bits)
    if symmetric:
        scale = as_fp16((hi * ratio / (top / 2)).clamp(min=MIN_SCALE))
        return Grid(scale, torch.full_like(scale, top / 2))
    lo, hi = lo * ratio, hi * ratio
    floor = torch.maximum(lo.abs(), hi.abs()) / MAX_ZERO
    scale = as_fp16(torch.maximum((hi - lo) / top, floor).clamp(min=MIN_SCALE))
    return Grid(scale, as_fp16(-lo / scale))


def fit_minmax(w: torch.Tensor, bits: int, symmetric: bool) -> Grid:
    """The grid over each group's full range; w is [..., G], one group per last-dim row."""
    return grid_for_range(*group_range(w, symmetric), bits, symmetric)


def quantize(w: torch.Tensor, grid: Grid, bits: int) -> torch.Tensor:
    """Round to the nearest code: float tensor of integers in 0 .. 2^bits - 1."""
    return torch.clamp(torch.round(w / grid.scale + grid.zero), 0, top_code(bits))


def dequantize(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    return grid.scale * (codes - grid.zero)


def rounding_error(w: torch.Tensor, grid: Grid, bits: int) -> torch.Tensor:
    """dequantize(quantize(w)) - w, computed in place in one buffer (the clip search's hot loop)."""
    d = w / grid.scale
    d.add_(grid.zero).round_().clamp_(0, top_code(bits)).sub_(grid.zero).mul_(grid.scale).sub_(w)
    return d


def squared_error(diff: torch.Tensor) -> torch.Tensor:
    return diff.square_().sum(-1, keepdim=True)


def fit_clipped(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    error: Callable[[torch.Tensor], torch.Tensor] = squared_error,
) -> Grid:
    """The min/max grid shrunk, per group, by the ratio with the least
    `error(dequantized - w)` (which returns one value per group, shaped [..., 1], and may
    overwrite its argument)."""
    lo, hi = group_range(w, symmetric)
    best_ratio = torch.ones_like(lo)
    best_err = torch.full_like(lo, float("inf"))

    def consider(ratio):
        nonlocal best_ratio, best_err
        err = error(rounding_error(w, grid_for_range(lo, hi, bits, symmetric, ratio), bits))
        better = err < best_err
        best_ratio = torch.where(better, ratio, best_ratio)
        best_err = torch.where(better, err, best_err)

    for ratio in CLIP_RATIOS:
        consider(torch.full_like(lo, ratio))
    coarse = best_ratio
    for step in (CLIP_REFINE, -CLIP_REFINE):
        consider((coarse + step).clamp(max=1.0))
    return grid_for_range(lo, hi, bits, symmetric, best_ratio)


REFINE_ROUNDS = 4


def refine_least_squares(
    w: torch.Tensor,
    grid: Grid,
    bits: int,
    symmetric: bool,
    importance: torch.Tensor | None = None,
    error: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rounds: int = REFINE_ROUNDS,
) -> Grid:
    """Improve `grid` for groups w [..., G]: round, then fit w ~ s * (q - z) by least squares
    weighted by `importance` (broadcastable to w; default 1), s and z both (symmetric: s
    alone), repeated `rounds` times. A group takes a fitted grid only where
    `error(dequantized - w)` drops (by default the squared error weighted as the fit is), so
    the result is never worse than `grid` by that measure."""
    def weighted_sum(t: torch.Tensor) -> torch.Tensor:
        return (t if importance is None else t * importance).sum(-1, keepdim=True)

    if error is None:
        def error(diff: torch.Tensor) -> torch.Tensor:
            return weighted_sum(diff.square_())

    sw, sx = weighted_sum(torch.ones_like(w)), weighted_sum(w)
    best, best_err = grid, error(rounding_error(w, grid, bits))
    for _ in range(rounds):
        q = quantize(w, best, bits)
        sq, sqq, sqx = weighted_sum(q), weighted_sum(q * q), weighted_sum(q * w)
        if symmetric:  # w ~ s (q - z), z fixed
            z = best.zero
            scale = (sqx - z * sx) / (sqq - 2 * z * sq + z * z * sw)
            offset = -scale * z
        else:  # the normal equations of w ~ s q + m
            scale = (sw * sqx - sq * sx) / (sw * sqq - sq * sq)
            offset = (sx - scale * sq) / sw
        usable = torch.isfinite(scale) & (scale > MIN_SCALE) & (offset.abs() <= MAX_ZERO * scale)
        scale = as_fp16(torch.where(usable, scale, best.scale))
        zero = best.zero if symmetric else torch.where(usable, as_fp16(-offset / scale), best.zero)
        candidate = Grid(scale, zero)
        err = error(rounding_error(w, candidate, bits))
        better = err < best_err
        best = Grid(torch.where(better, scale, best.scale), torch.where(better, zero, best.zero))
        best_err = torch.where(better, err, best_err)
    return best


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, K // G, G]: the groups of each row along the input dimension."""
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size)


def to_packed(codes: torch.Tensor, grid: Grid, bits: int, ternary: bool = False) -> PackedWeight:
    """Codes [N, K // G, G] and their grid ([N, K // G, 1]) -> the packed format, in CPU memory
    wherever the quantizer ran (packed weights are saved and prepared for kernels from there)."""
    n, groups, group_size = codes.shape
    return PackedWeight(
        planes=pack_planes(codes.reshape(n, groups * group_size).to(torch.uint8), bits).cpu(),
        scales=grid.scale.reshape(n, groups).to(torch.float16).cpu(),
        zeros=grid.zero.reshape(n, groups).to(torch.float16).cpu(),
        bits=bits,
        group_size=group_size,
        ternary=ternary,
    )
