"""Round-to-nearest (RTN): each group's grid spans its min and max, each weight takes the
nearest code on it. No calibration data; the baseline that AWQ and GPTQ improve on.

The grid is not clipped to minimize the weights' squared error: on SmolLM2-135M that made
perplexity worse (4-bit g64, first 4 chunks of WikiText-2: 31.4 clipped, 30.4 min/max),
because weight error treats the largest weights, which matter most, like any other.
"""

from __future__ import annotations

import torch

from lutlm.formats.packed import PackedWeight
from lutlm.quantize.grid import fit_minmax, grouped, quantize, to_packed


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> PackedWeight:
    """w float [N, K] -> packed b-bit weight with one grid per group of `group_size` inputs."""
    groups = grouped(w.float(), group_size)
    grid = fit_minmax(groups, bits, symmetric)
    return to_packed(quantize(groups, grid, bits), grid, bits)
