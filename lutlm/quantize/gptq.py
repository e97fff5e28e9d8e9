"""GPTQ (Frantar et al., 2022): quantize a weight matrix one input column at a time and
push each column's rounding error onto the columns not yet quantized, weighted by the
inverse Hessian of the layer's squared output error, H = E[x x^T] over calibration inputs.

Steps, as in the reference implementation:
  1. Inputs that are always zero (H[k, k] == 0) get H[k, k] = 1 and weight 0.
  2. Damping: H += damp * mean(diag H) * I, so that H is safely positive definite.
  3. U = the upper Cholesky factor of H^-1; column k's error, divided by U[k, k], is
     spread over later columns along row k of U.
  4. Columns are processed in blocks (lazy batch updates): later blocks receive one
     matrix product per block instead of one rank-1 update per column.

Group grids: the squared-error clipped grid (grid.fit_clipped), refitted to its codes by
least squares weighted by each column's H[k, k] (grid.refine_least_squares). Without
activation order a group's grid is fitted when its first column is reached, on the
weights as updated so far; blocks are whole groups, so the group's columns are up to date
at that moment. With activation order (columns by decreasing
H[k, k]) the columns of a group are no longer visited together, so every group's grid is
fitted up front on the original weights ("static groups"); this keeps groups contiguous
in the original column order, which the packed format requires.
"""

from __future__ import annotations

import torch

from lutlm.formats.packed import PackedWeight
from lutlm.quantize.grid import Grid, fit_clipped, grouped, refine_least_squares, to_packed, top_code

BLOCK_COLUMNS = 128


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1."""
    k = hessian.shape[0]
    h = hessian + damp * torch.diag(hessian).mean() * torch.eye(k, dtype=hessian.dtype, device=hessian.device)
    lower, info = torch.linalg.cholesky_ex(h)
    if info:
        raise ValueError(f"the Hessian is not positive definite with damping {damp}; use a larger damping")
    # H^-1 = L^-T L^-1 by a triangular solve: torch.cholesky_inverse is single-threaded
    # on CPU and some 20x slower at K = 1536.
    lower_inv = torch.linalg.solve_triangular(lower, torch.eye(k, dtype=h.dtype, device=h.device), upper=False)
    return torch.linalg.cholesky(lower_inv.T @ lower_inv, upper=True)


def quantize_gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
) -> PackedWeight:
    """w float [N, K], hessian [K, K] (E[x x^T] of the layer's inputs) -> packed weight."""
    w = w.float().clone()
    h = hessian.float().clone()
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"the Hessian is {tuple(h.shape)}, expected {(k, k)} for a weight with {k} inputs")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    n_groups = k // group_size
    scale = torch.zeros(n, n_groups, 1, device=w.device)
    zero = torch.zeros(n, n_groups, 1, device=w.device)
    fit_up_front = act_order or group_size == k
    importance = torch.diag(h)  # column k's weight in the layer's output error, cross terms aside

    def fit(groups: torch.Tensor, weights: torch.Tensor) -> Grid:
        """The clipped grid, refitted by least squares weighted by the columns' H[k, k]."""
        return refine_least_squares(groups, fit_clipped(groups, bits, symmetric), bits, symmetric, weights)

    if fit_up_front:
        grid = fit(grouped(w, group_size), importance.view(-1, group_size))
        scale, zero = grid.scale, grid.zero
    order = torch.argsort(importance, descending=True) if act_order else torch.arange(k, device=w.device)
    w = w[:, order]
    h = h[order][:, order]
    u = inverse_hessian_factor(h, damp)

    top = top_code(bits)
    codes = torch.zeros(n, k, device=w.device)
    block = group_size * max(1, BLOCK_COLUMNS // group_size) if group_size < k else BLOCK_COLUMNS
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            column = int(order[i1 + j])
            g = column // group_size
            if not fit_up_front and column % group_size == 0:
                fitted = fit(w1[:, j : j + group_size], importance[column : column + group_size])
                scale[:, g], zero[:, g] = fitted.scale, fitted.zero
            s, z = scale[:, g, 0], zero[:, g, 0]
            q = torch.clamp(torch.round(w1[:, j] / s + z), 0, top)
            codes[:, i1 + j] = q
            e = (w1[:, j] - s * (q - z)) / u1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            err1[:, j] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    codes = codes[:, torch.argsort(order)]
    return to_packed(grouped(codes, group_size), Grid(scale, zero), bits)
