"""AWQ (Lin et al., 2023): activation-aware scaling before quantization.

Input channels that carry large activations matter most to the output. AWQ multiplies
weight column k by s[k] > 1 for such channels (so they get relatively finer steps) and
divides the input by s[k]; the division is folded into the operation that produces the
input (an RMSNorm's weight, or the rows of the projection before), so it costs nothing.

    s = mean|x|^alpha, normalized to geometric mid-range 1, alpha in {0, 0.05, ..., 0.95}
    chosen to minimize the output error of every linear that reads this input (rounded on
    min/max grids), then kept only if the final quantizer does better with it than without.

Then each group's clip range is searched (AWQ's auto-clip) against the same output error,
and the grid refitted to its codes by least squares weighted by each input's H[k, k],
kept where that output error drops (grid.refine_least_squares).
Both searches measure the error of a weight change d (rows [N, K]) through the calibration
inputs' second moment H = E[x x^T]: E||x d^T||^2 = sum_n d_n H d_n^T, over all calibration
tokens at a cost independent of how many were seen. The scale search, which evaluates 20
candidates per input, uses H's leading SCALE_SEARCH_RANK eigen-directions, H ~ F F^T with F
[K, r]: ||d F||^2 costs N K r instead of N K^2 and keeps nearly all of H's energy, since a
transformer's activations concentrate in few directions. The clip search, like AWQ's,
treats groups independently and uses the exact diagonal blocks of H.
"""

from __future__ import annotations

from typing import Callable

import torch

from lutlm.formats.packed import PackedWeight
from lutlm.quantize.gptq import quantize_gptq
from lutlm.quantize.grid import (fit_clipped, fit_minmax, grouped, quantize, refine_least_squares, rounding_error,
                                 to_packed)

ALPHAS = tuple(i / 20 for i in range(20))
SCALE_SEARCH_RANK = 128


def output_error(diff: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """E||x diff^T||^2 for a weight change diff [N, K] and H = E[x x^T] [K, K]."""
    return ((diff @ hessian) * diff).sum()


def hessian_factor(hessian: torch.Tensor, rank: int = SCALE_SEARCH_RANK) -> torch.Tensor:
    """F [K, r] with F F^T the best rank-r approximation of the (symmetric, PSD) H."""
    values, vectors = torch.linalg.eigh(hessian.double())
    top = values[-rank:].clamp(min=0)
    return (vectors[:, -rank:] * top.sqrt()).float()


def minmax_rounding_error(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """(w rounded on each group's min/max grid) - w, dense [N, K] (the scale search's quantizer)."""
    groups = grouped(w, group_size)
    return rounding_error(groups, fit_minmax(groups, bits, symmetric), bits).reshape(w.shape)


def search_scales(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    mean_abs: torch.Tensor,
    bits: int,
    group_sizes: list[int],
    symmetric: bool = False,
) -> torch.Tensor:
    """Per-input-channel scales [K] for linears `weights` (each [N_i, K], grouped by
    `group_sizes[i]`) that share one input with H = E[x x^T] and mean |x| = `mean_abs`."""
    factor = hessian_factor(hessian)
    best_scales, best_err = torch.ones_like(mean_abs), float("inf")
    for alpha in ALPHAS:
        s = mean_abs.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        # The scaled weight's rounding error, seen through inputs x / s: (err / s) F.
        scaled_factor = factor / s.view(-1, 1)
        err = 0.0
        for w, group_size in zip(weights, group_sizes):
            diff = minmax_rounding_error(w * s, bits, group_size, symmetric)
            err += float((diff @ scaled_factor).square().sum())
        if err < best_err:
            best_scales, best_err = s, err
    # The sweep rounds on min/max grids; the final grids (clipped and refitted) gain more on
    # the unscaled weights than on some scaled ones, so the winner is checked against no
    # scaling with the final quantizer (on SmolLM2's layers it lost in 3 of 4 cases tried).
    unscaled = torch.ones_like(mean_abs)

    def final_error(s: torch.Tensor) -> float:
        return sum(float(output_error(quantize_awq(w, hessian, s, bits, g, symmetric).dequantize().to(w.device) / s - w, hessian))
                   for w, g in zip(weights, group_sizes))

    return best_scales if final_error(best_scales) < final_error(unscaled) else unscaled


def group_output_error(hessian: torch.Tensor, group_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """error(diff [N, K // G, G]) -> [N, K // G, 1]: each group's output error through the
    diagonal block of H that its inputs form."""
    k = hessian.shape[0]
    starts = torch.arange(0, k, group_size, device=hessian.device)
    index = starts.view(-1, 1) + torch.arange(group_size, device=hessian.device).view(1, -1)
    blocks = hessian[index.unsqueeze(-1), index.unsqueeze(1)]  # [K // G, G, G]

    def error(diff: torch.Tensor) -> torch.Tensor:
        weighted = torch.einsum("ngi,gij->ngj", diff, blocks)
        return (weighted * diff).sum(-1, keepdim=True)

    return error


def scaled_layer(w: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer as it is quantized once 1 / scales is folded into its input's producer: weights
    w * scales (columns) and the Hessian of the scaled inputs x / scales."""
    return w.float() * scales, hessian / scales.view(-1, 1) / scales.view(1, -1)


def quantize_awq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
) -> PackedWeight:
    """Quantize w * scales (columns) with clip ranges searched on the output error of the
    scaled inputs x / scales. The caller folds 1 / scales into the input's producer."""
    scaled_w, scaled_h = scaled_layer(w, hessian, scales)
    groups = grouped(scaled_w, group_size)
    error = group_output_error(scaled_h, group_size)
    grid = fit_clipped(groups, bits, symmetric, error)
    grid = refine_least_squares(groups, grid, bits, symmetric, torch.diag(scaled_h).view(-1, group_size), error)
    return to_packed(quantize(groups, grid, bits), grid, bits)


def quantize_awq_gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
) -> PackedWeight:
    """AWQ's scales, then GPTQ's rounding: GPTQ on w * scales (columns) with the Hessian of the
    scaled inputs x / scales. The caller folds 1 / scales into the input's producer."""
    return quantize_gptq(*scaled_layer(w, hessian, scales), bits, group_size, symmetric, damp, act_order)
