"""Canonical packed weights -> the CPU kernels' layouts, done once at load time.

The byte-level layouts are documented in csrc/lutlm.h (table lookup) and
csrc/dequant.cpp (the dequantize-then-multiply baseline); this module only
permutes bits into them with plain tensor indexing.

Sizes the kernels accept: any group size that is a multiple of 32, or one group per row
(any K, padded with zero activations to a multiple of 32, or of 96 for the ternary table).
Each table-quantization block (`q_block`) is the largest of 128, 96, 64, 32 inputs dividing
the group: the int8 tables of one block share one scale, and a block's integer sums are
scaled once per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lutlm.formats.packed import PackedWeight

TILE_ROWS = 16
STEP = 32  # inputs per K-step of the bit-plane layouts
TERNARY_STEP = 96  # inputs per K-step of the ternary layout (32 chunks of 3)
Q_BLOCKS = (128, 96, 64, 32)


@dataclass
class KernelShape:
    k_padded: int
    group_size: int  # in padded inputs
    q_block: int
    ternary_tables: bool  # the direct ternary layout (else bit-planes)


def kernel_shape(w: PackedWeight, ternary_tables: bool) -> KernelShape:
    """Padding and blocking for `w`, or a ValueError naming what the kernels cannot do."""
    k, g = w.in_features, w.group_size
    whole_row = g == k
    if not whole_row and g % STEP:
        raise ValueError(
            f"group size {g} is not supported by the CPU kernels: use a multiple of {STEP} "
            f"or one group per row (group size = in_features = {k})"
        )
    if ternary_tables:
        if not w.ternary:
            raise ValueError("the ternary table layout needs a ternary weight (codes t + 1, zeros 1)")
        if whole_row:
            k_padded = -(-k // TERNARY_STEP) * TERNARY_STEP
            return KernelShape(k_padded, k_padded, TERNARY_STEP, True)
        if g % TERNARY_STEP:
            raise ValueError(f"the ternary table layout needs a group size that is a multiple of {TERNARY_STEP}, not {g}")
        return KernelShape(k, g, TERNARY_STEP, True)
    k_padded = -(-k // STEP) * STEP if whole_row else k
    group = k_padded if whole_row else g
    q_block = next(q for q in Q_BLOCKS if group % q == 0)
    return KernelShape(k_padded, group, q_block, False)


def _bits(w: PackedWeight, k_padded: int) -> torch.Tensor:
    """Code bits uint8 [bits, rows padded to tiles, k_padded], zero in the padding."""
    b, n, kb = w.planes.shape
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = ((w.planes.unsqueeze(-1) >> shifts) & 1).reshape(b, n, kb * 8)
    n_pad = -(-n // TILE_ROWS) * TILE_ROWS
    return torch.nn.functional.pad(bits, (0, k_padded - kb * 8, 0, n_pad - n))


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return lo | (hi << 4)


def lut_codes(w: PackedWeight, shape: KernelShape) -> torch.Tensor:
    """Bit patterns in the table-lookup layout: uint8 [tiles, steps, bits, 16 rows, 4]."""
    if shape.ternary_tables:
        return ternary_codes(w, shape)
    b, n, kb = w.planes.shape
    n_pad, kp = -(-n // TILE_ROWS) * TILE_ROWS, shape.k_padded
    tiles, steps = n_pad // TILE_ROWS, kp // STEP
    # Pattern of plane i over chunk c: bit j of it is the code bit of input 4c + j. A plane byte
    # holds inputs 8m .. 8m + 7 from bit 0 up, so chunk 2m is its low nibble and 2m + 1 its high.
    planes = torch.nn.functional.pad(w.planes, (0, kp // 8 - kb, 0, n_pad - n))
    pat = torch.stack([planes & 0x0F, planes >> 4], dim=-1)
    pat = pat.view(b, tiles, TILE_ROWS, steps, 8)  # [plane, tile, row, step, chunk]
    blocks = []
    if b == 4:  # byte (r, p): plane p; low nibble chunk 2j, high nibble chunk 2j + 1
        byte = _nibbles(pat[..., 0::2], pat[..., 1::2])  # [p, tile, r, step, j]
        blocks.append(byte.permute(1, 3, 4, 2, 0))
    if b in (2, 3):  # plane p & 1; low nibble chunk 4j + (p >> 1), high nibble 4j + 2 + (p >> 1)
        p2 = pat[:2].reshape(2, tiles, TILE_ROWS, steps, 2, 2, 2)  # [plane, ..., j, half, c]
        byte = _nibbles(p2[..., 0, :], p2[..., 1, :])  # [plane, tile, r, step, j, c]
        blocks.append(byte.permute(1, 3, 4, 2, 5, 0).reshape(tiles, steps, 2, TILE_ROWS, 4))
    if b in (1, 3):  # plane 0 (1 bit) or 2 (3 bits); low nibble chunk p, high nibble 4 + p
        p1 = pat[b - 1].reshape(tiles, TILE_ROWS, steps, 2, 4)
        byte = _nibbles(p1[..., 0, :], p1[..., 1, :])  # [tile, r, step, p]
        blocks.append(byte.permute(0, 2, 1, 3).unsqueeze(2))
    return torch.cat(blocks, dim=2).contiguous()


def ternary_codes(w: PackedWeight, shape: KernelShape) -> torch.Tensor:
    """Ternary layout: per tile and K-step, 4 blocks of magnitude nibbles then 64 bytes of signs."""
    bits = _bits(w, shape.k_padded)
    t = (bits[0] | (bits[1] << 1)).to(torch.int8) - 1  # code t + 1 -> t
    n_pad, kp = t.shape
    t[w.out_features:] = 0
    t[:, w.in_features:] = 0  # padding is t = 0 (code 1), not code 0
    tiles, steps = n_pad // TILE_ROWS, kp // TERNARY_STEP
    c = t.view(n_pad, kp // 3, 3).to(torch.int16)
    e = 9 * c[..., 0] + 3 * c[..., 1] + c[..., 2]  # pattern value in -13 .. 13
    mag = e.abs().to(torch.uint8).view(tiles, TILE_ROWS, steps, 4, 2, 4)  # [..., j, half, p]
    neg = (e < 0).to(torch.uint8).view(tiles, TILE_ROWS, steps, 4, 2, 4)
    mags = _nibbles(mag[..., 0, :], mag[..., 1, :]).permute(0, 2, 3, 1, 4)  # [tile, step, j, r, p]
    sign_bits = neg.permute(0, 2, 3, 4, 1, 5).reshape(tiles, steps, 4, 2, 8, 8)  # bit 4r + p
    signs = (sign_bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return torch.cat([mags.reshape(tiles, steps, 256), signs.reshape(tiles, steps, 64)], dim=2).contiguous()


def tile_scales(w: PackedWeight, shape: KernelShape) -> torch.Tensor:
    """fp16 [tiles, groups, 2, 16]: each tile's 16 scales, then its 16 zeros, per group."""
    n = w.out_features
    n_pad = -(-n // TILE_ROWS) * TILE_ROWS
    pad = (0, 0, 0, n_pad - n)
    s = torch.nn.functional.pad(w.scales, pad).view(n_pad // TILE_ROWS, TILE_ROWS, -1)
    z = torch.nn.functional.pad(w.zeros, pad).view(n_pad // TILE_ROWS, TILE_ROWS, -1)
    return torch.stack([s, z], dim=2).permute(0, 3, 2, 1).contiguous()


def dequant_codes(w: PackedWeight, shape: KernelShape) -> torch.Tensor:
    """Codes in the dequantize-then-multiply baseline's layout: uint8 [tiles, steps, bits, 16, 4]."""
    bits = _bits(w, shape.k_padded)
    b, n_pad, kp = bits.shape
    tiles, steps = n_pad // TILE_ROWS, kp // STEP
    q = torch.zeros(n_pad, kp, dtype=torch.uint8)
    for i in range(b):
        q |= bits[i] << i
    q = q.view(tiles, TILE_ROWS, steps, STEP)  # [tile, r, step, input]
    blocks = []
    if b == 4:  # block j: low nibble input 8j + p, high nibble 8j + 4 + p
        v = q.view(tiles, TILE_ROWS, steps, 4, 2, 4)
        blocks.append(_nibbles(v[..., 0, :], v[..., 1, :]).permute(0, 2, 3, 1, 4))
    if b in (2, 3):  # block j: bits 2m, 2m + 1 hold input 16j + 4m + p
        v = (q & 3).view(tiles, TILE_ROWS, steps, 2, 4, 4)  # [..., j, m, p]
        packed = (v << (2 * torch.arange(4, dtype=torch.uint8)).view(4, 1)).sum(-2, dtype=torch.uint8)
        blocks.append(packed.permute(0, 2, 3, 1, 4))
    if b in (1, 3):  # one block: bit m holds input 4m + p
        v = ((q >> (b - 1)) & 1).view(tiles, TILE_ROWS, steps, 8, 4)  # [..., m, p]
        packed = (v << torch.arange(8, dtype=torch.uint8).view(8, 1)).sum(-2, dtype=torch.uint8)
        blocks.append(packed.permute(0, 2, 1, 3).unsqueeze(2))
    return torch.cat(blocks, dim=2).contiguous()
