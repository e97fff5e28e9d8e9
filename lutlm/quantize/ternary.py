"""Ternary weights {-1, 0, +1} with an absmean scale, as BitNet b1.58 quantizes them:

    gamma = mean |w| over the scale's span,   t = clamp(round(w / gamma), -1, 1),   w ~ gamma * t

The span is the whole tensor or a group of G inputs. Stored in the packed format as 2-bit
codes q = t + 1 with zero 1 (lutlm.formats.packed). A per-tensor scale is written as
group_size = K with the one gamma repeated on every row: N fp16 values instead of one, a
cost of 16 / K bits per weight (0.03 for K = 576) that keeps one layout for every kernel.
"""

from __future__ import annotations

import torch

from lutlm.formats.packed import PackedWeight
from lutlm.quantize.grid import MIN_SCALE, Grid, as_fp16, grouped, to_packed


def quantize_ternary(w: torch.Tensor, group_size: int | None = None) -> PackedWeight:
    """w float [N, K] -> ternary packed weight; group_size None means one scale per tensor."""
    w = w.float()
    n, k = w.shape
    groups = grouped(w, group_size or k)
    if group_size is None:
        gamma = w.abs().mean().expand(n, 1, 1)
    else:
        gamma = groups.abs().mean(-1, keepdim=True)
    gamma = as_fp16(gamma.clamp(min=MIN_SCALE))
    codes = torch.clamp(torch.round(groups / gamma), -1, 1) + 1
    return to_packed(codes, Grid(gamma, torch.ones_like(gamma)), bits=2, ternary=True)
