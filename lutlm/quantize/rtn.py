"""Round-to-nearest (RTN): each weight takes the nearest code on its group's grid. No
calibration data; the baseline that AWQ and GPTQ improve on.

The grid is the group's range clipped to the least squared error (grid.fit_clipped), then
refitted to its codes by least squares (grid.refine_least_squares), as llama.cpp's k-quants
fit theirs. On SmolLM2-135M (`lutlm bench ppl --max-chunks 16`: 4,080 WikiText-2 tokens) that
took perplexity from 41.0 with the plain min/max grid to 36.5 at 4-bit g64, and from 46.1
to 42.5 at g128; the clip search alone gave 41.3 and 44.7.
"""

from __future__ import annotations

import torch

from lutlm.formats.packed import PackedWeight
from lutlm.quantize.grid import Grid, fit_clipped, grouped, quantize, refine_least_squares, to_packed


# Rows fitted at a time: the grid search passes over its groups some thirty times, and 64 rows
# stay in cache for all of them (the whole matrix streamed from memory on each pass; timings in
# docs/quantization.md). Groups are fitted independently, so the result is the same.
ROWS_PER_STEP = 64


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> PackedWeight:
    """w float [N, K] -> packed b-bit weight with one grid per group of `group_size` inputs."""
    codes, scales, zeros = [], [], []
    for rows in w.split(ROWS_PER_STEP):
        groups = grouped(rows.float(), group_size)
        grid = refine_least_squares(groups, fit_clipped(groups, bits, symmetric), bits, symmetric)
        codes.append(quantize(groups, grid, bits).to(torch.uint8))
        scales.append(grid.scale)
        zeros.append(grid.zero)
    return to_packed(torch.cat(codes), Grid(torch.cat(scales), torch.cat(zeros)), bits)
