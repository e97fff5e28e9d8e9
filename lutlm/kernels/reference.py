"""Reference mpGEMM in plain PyTorch, slow on purpose: every other kernel is tested against it.

The backend functions (prepare, matmul) dequantize the packed weight, then multiply.
`lut_matmul_reference` computes the same product the table-lookup way, step by step, as
the statement of the algorithm the CPU and GPU kernels implement.
"""

from __future__ import annotations

import torch

from lutlm.formats.packed import PackedWeight


def available() -> bool:
    return True


def prepare(w: PackedWeight) -> torch.Tensor:
    # The dense fp32 matrix is kept, so that the reference path costs one matmul per call.
    return w.dequantize(torch.float32)


def matmul(x: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x.to(handle.dtype), handle.t())


def lut_matmul_reference(x: torch.Tensor, w: PackedWeight, table_block: int | None = None) -> torch.Tensor:
    """The table-lookup algorithm written plainly: y [..., N] = x [..., K] @ W^T.

    1. For each chunk of 4 activations, a table of its 16 signed sums: entry e is
       sum_j (+x_j if bit j of e is set else -x_j), summed left to right.
    2. With `table_block`, tables are rounded to int8 with one scale per block of that
       many inputs (scale = largest |entry| / 127), as the CPU kernels' int8 mode does
       (a last, partial block counts as padded with zero activations).
    3. Every bit-plane i of every row reads one entry per chunk, indexed by its 4 bits.
    4. Per group: s * (1/2 sum_i 2^i sum_chunks lookup + ((2^b - 1)/2 - z) * sum x)
       (the identity in lutlm/formats/packed.py).
    """
    n, k, g = w.out_features, w.in_features, w.group_size
    x2 = x.reshape(-1, k).to(torch.float32)
    batch = x2.shape[0]
    chunks = x2.view(batch, k // 4, 1, 4)
    pattern_bits = (torch.arange(16).view(16, 1) >> torch.arange(4)) & 1  # [entry, j]
    signed = torch.where(pattern_bits.bool(), chunks, -chunks)  # [batch, chunk, entry, j]
    tables = signed[..., 0] + signed[..., 1]
    tables = tables + signed[..., 2]
    tables = tables + signed[..., 3]  # [batch, chunk, entry]
    if table_block is not None:
        per_block = table_block // 4
        n_blocks = -(-(k // 4) // per_block)
        padded = torch.nn.functional.pad(tables, (0, 0, 0, n_blocks * per_block - k // 4))
        blocks = padded.view(batch, n_blocks, per_block * 16)
        amax = blocks.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        tables = (torch.round(blocks * inv) * (amax / 127.0)).view(batch, -1, 16)[:, : k // 4]

    codes = w.codes().view(n, k // 4, 4)
    flat = tables.reshape(batch, k // 4 * 16)
    chunk_base = (torch.arange(k // 4) * 16).view(1, k // 4)
    acc = torch.zeros(batch, n, k // g)
    for i in range(w.bits):
        patterns = (((codes >> i) & 1).to(torch.int64) << torch.arange(4)).sum(-1)  # [n, chunk]
        lookups = flat[:, (chunk_base + patterns).view(-1)].view(batch, n, k // g, g // 4)
        acc += 2.0**i * lookups.sum(-1)
    mid = ((1 << w.bits) - 1) / 2
    x_sum = x2.view(batch, 1, k // g, g).sum(-1)
    s, z = w.scales.float(), w.zeros.float()
    y = (s * (0.5 * acc + (mid - z) * x_sum)).sum(-1)
    return y.view(*x.shape[:-1], n)
