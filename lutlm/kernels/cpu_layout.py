"""Canonical packed weights -> the CPU kernels' layouts, done once at load time.

The byte-level layouts are documented in csrc/lutlm.h (table lookup, and the dot-product
kernels' DOT layout); this module permutes bits into them with plain tensor indexing. The
dot layout is written in native code at load time (csrc/dot_pack.cpp, through
cpu.prepare); `dot_codes` here is its plain statement, which the tests hold it to.

Sizes the table-lookup kernels accept: 1 to 4 bits, any group size that is a multiple of
32, or one group per row (any K, padded with zero activations to a multiple of 32, or of 96
for the ternary table). Each table-quantization block (`q_block`) is the largest of 128, 96,
64, 32 inputs dividing the group: the int8 tables of one block share one scale, and a
block's integer sums are scaled once per block. The dot kernels take 1 to 8 bits and also
groups of 16 (q_block 32, two groups per block; K padded to a multiple of 32).
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


LUT_MAX_BITS = 4
DOT_MAX_BITS = 8
DOT_SMALL_GROUP = 16  # the one group size below a K-step that the dot kernels take


def kernel_shape(w: PackedWeight, ternary_tables: bool) -> KernelShape:
    """Padding and blocking of `w` for the table-lookup kernels, or a ValueError naming what
    they cannot do."""
    return lut_shape(w.bits, w.group_size, w.in_features, w.ternary, ternary_tables)


def lut_shape(bits: int, group_size: int, in_features: int, ternary: bool = False,
              ternary_tables: bool = False) -> KernelShape:
    """kernel_shape from the weight's description alone."""
    k, g = in_features, group_size
    whole_row = g == k
    if not 1 <= bits <= LUT_MAX_BITS:
        raise ValueError(
            f"bits={bits} is not supported by the CPU table-lookup kernels (1 to {LUT_MAX_BITS} bits): "
            f"the dot kernels (kernel='dot') run up to {DOT_MAX_BITS}"
        )
    if g <= 0 or k % g:
        raise ValueError(f"group size {g} does not divide in_features={k}")
    if not whole_row and g % STEP:
        hint = " (the dot kernels, kernel='dot', run groups of 16)" if g == DOT_SMALL_GROUP else ""
        raise ValueError(
            f"group size {g} is not supported by the CPU kernels' table lookup: use a multiple of {STEP} "
            f"or one group per row (group size = in_features = {k}){hint}"
        )
    if ternary_tables:
        if not ternary:
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
    """fp16 [tiles, groups, 2, 16]: each tile's 16 scales, then its 16 zeros, per group (of
    k_padded: padded rows, and groups of 16 past K, hold 0)."""
    n = w.out_features
    n_pad = -(-n // TILE_ROWS) * TILE_ROWS
    pad = (0, shape.k_padded // shape.group_size - w.scales.shape[1], 0, n_pad - n)
    s = torch.nn.functional.pad(w.scales, pad).view(n_pad // TILE_ROWS, TILE_ROWS, -1)
    z = torch.nn.functional.pad(w.zeros, pad).view(n_pad // TILE_ROWS, TILE_ROWS, -1)
    return torch.stack([s, z], dim=2).permute(0, 3, 2, 1).contiguous()


def dot_shape(bits: int, group_size: int, in_features: int) -> KernelShape:
    """Padding and blocking for the dot kernels (csrc/dot_pack.cpp computes the same), or a
    ValueError naming what they cannot do."""
    k, g = in_features, group_size
    if not 1 <= bits <= DOT_MAX_BITS:
        raise ValueError(f"bits={bits} is not supported by the CPU dot kernels (1 to {DOT_MAX_BITS} bits)")
    k_padded = -(-k // STEP) * STEP
    if g == k:
        return KernelShape(k_padded, k_padded, next(q for q in Q_BLOCKS if k_padded % q == 0), False)
    if g <= 0 or k % g:
        raise ValueError(f"group size {g} does not divide in_features={k}")
    if g != DOT_SMALL_GROUP and g % STEP:
        raise ValueError(
            f"group size {g} is not supported by the CPU dot kernels: use {DOT_SMALL_GROUP}, a multiple of "
            f"{STEP}, or one group per row (group size = in_features = {k})"
        )
    return KernelShape(k_padded, g, next(q for q in Q_BLOCKS if g % q == 0) if g % STEP == 0 else STEP, False)


def _dot_section(v: torch.Tensor, width: int) -> list[torch.Tensor]:
    """The blocks [tiles, steps, 16, 4] of a section of `width` bits (v: fields < 2^width,
    [tiles, 16, steps, 32]), in the arrangement of lutlm.h's DOT layout."""
    tiles, rows, steps, _ = v.shape
    if width == 3:  # a 2-bit section of the low bits, then a 1-bit one of the top bit
        return _dot_section(v & 3, 2) + _dot_section(v >> 2, 1)
    if width == 4:  # block j: low nibble input 8j + p, high nibble 8j + 4 + p
        u = v.view(tiles, rows, steps, 4, 2, 4)
        blocks = _nibbles(u[..., 0, :], u[..., 1, :])  # [tile, r, step, j, p]
    elif width == 2:  # block j: bits 2m, 2m + 1 hold input 16j + 4m + p
        u = v.view(tiles, rows, steps, 2, 4, 4)  # [..., j, m, p]
        blocks = (u << (2 * torch.arange(4, dtype=torch.uint8)).view(4, 1)).sum(-2, dtype=torch.uint8)
    else:  # one block: bit m holds input 4m + p
        u = v.view(tiles, rows, steps, 1, 8, 4)
        blocks = (u << torch.arange(8, dtype=torch.uint8).view(8, 1)).sum(-2, dtype=torch.uint8)
    return list(blocks.permute(3, 0, 2, 1, 4))  # per block: [tile, step, r, p]


def dot_codes(w: PackedWeight, shape: KernelShape) -> torch.Tensor:
    """Codes in the dot kernels' layout (lutlm.h): uint8 [tiles, steps, bits, 16, 4]."""
    n, k, b = w.out_features, w.in_features, w.bits
    n_pad, kp = -(-n // TILE_ROWS) * TILE_ROWS, shape.k_padded
    tiles, steps = n_pad // TILE_ROWS, kp // STEP
    q = torch.nn.functional.pad(w.codes(), (0, kp - k, 0, n_pad - n)).view(tiles, TILE_ROWS, steps, STEP)
    if b == 8:  # whole bytes: block j holds inputs 4j + p
        blocks = list(q.view(tiles, TILE_ROWS, steps, 8, 4).permute(3, 0, 2, 1, 4))
    else:
        blocks = _dot_section(q & 15, min(b, 4)) + (_dot_section(q >> 4, b - 4) if b > 4 else [])
    return torch.stack(blocks, dim=2).contiguous()
