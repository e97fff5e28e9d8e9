"""Dequantizers for ggml's tensor types, as stored in GGUF files.

Each block type is documented byte by byte, as in llama.cpp's ggml-common.h, with the
formula its reference ``dequantize_row_*`` (ggml-quants.c) evaluates. Every product is
taken in float32 in the reference's order, so results match gguf-py's dequantizers bit
for bit (tests/test_ggml_quants.py).

All multi-byte fields are little-endian. "f16" is IEEE half precision. A row of a tensor
is a sequence of whole blocks, so the innermost dimension is a multiple of the block size.

The implementations are vectorized over blocks with numpy; a tensor is processed in
chunks of blocks so that temporaries stay small (an 11008 x 4096 matrix, a 7B model's
largest, takes under a second on one core for the K-quants).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType

QK_K = 256  # weights per K-quant super-block
CHUNK_WEIGHTS = 1 << 22  # weights dequantized per step


def f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The f16 field at byte `offset` of each block, as float32 [n_blocks, 1]."""
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> [..., 2, n]: low nibbles first, then high nibbles."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


def _bits(mask: np.ndarray, count: int) -> np.ndarray:
    """Bytes [..., n] -> [..., count, n]: bit i of each byte in row i."""
    shifts = np.arange(count, dtype=np.uint8).reshape(count, 1)
    return (mask[..., None, :] >> shifts) & 1


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> [..., 4, n]: the 2-bit fields at bits 0-1, 2-3, 4-5, 6-7."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    return (qs[..., None, :] >> shifts) & 3


# --- 32-weight blocks -------------------------------------------------------------------
#
# block_q4_0 (18 bytes, 32 weights):
#     0  f16 d
#     2  u8  qs[16]    weight j < 16 is the low nibble of qs[j], weight j + 16 its high nibble
#     w = d * (q - 8)
#
# block_q4_1 (20 bytes, 32 weights):
#     0  f16 d
#     2  f16 m
#     4  u8  qs[16]    nibbles as in q4_0
#     w = d * q + m
#
# block_q5_0 (22 bytes, 32 weights):
#     0  f16 d
#     2  u8  qh[4]     a little-endian uint32 whose bit j is bit 4 (the fifth bit) of weight j
#     6  u8  qs[16]    low four bits, nibbles as in q4_0
#     w = d * (q - 16)
#
# block_q5_1 (24 bytes, 32 weights):
#     0  f16 d
#     2  f16 m
#     4  u8  qh[4]     as in q5_0
#     8  u8  qs[16]    as in q5_0
#     w = d * q + m
#
# block_q8_0 (34 bytes, 32 weights):
#     0  f16 d
#     2  i8  qs[32]
#     w = d * q


def q4_codes(qs: np.ndarray) -> np.ndarray:
    return _nibbles(qs).reshape(len(qs), 32)


def q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    high = _bits(qh, 8).transpose(0, 2, 1).reshape(len(qh), 32)  # bit j of the uint32 = bit j%8 of byte j//8
    return q4_codes(qs) | (high << 4)


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    q = q4_codes(blocks[:, 2:18]).astype(np.int8) - np.int8(8)
    return f16_field(blocks, 0) * q.astype(np.float32)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    return f16_field(blocks, 0) * q4_codes(blocks[:, 4:20]).astype(np.float32) + f16_field(blocks, 2)


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    q = q5_codes(blocks[:, 2:6], blocks[:, 6:22]).astype(np.int8) - np.int8(16)
    return f16_field(blocks, 0) * q.astype(np.float32)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    q = q5_codes(blocks[:, 4:8], blocks[:, 8:24])
    return f16_field(blocks, 0) * q.astype(np.float32) + f16_field(blocks, 2)


def q8_0_codes(qs: np.ndarray) -> np.ndarray:
    """int8 q as the unsigned code q + 128 (flipping the sign bit)."""
    return qs ^ np.uint8(0x80)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    return f16_field(blocks, 0) * blocks[:, 2:34].view(np.int8).astype(np.float32)


# --- K-quants: 256-weight super-blocks of 16 or 32-weight sub-blocks ------------------
#
# In every K-quant, the 256 weights are two halves of 128; within a half, the 2-bit fields
# (or nibbles) of one run of bytes hold consecutive 32-weight slices: weight
# 128*h + 32*s + l (l < 32) is field s of byte l of half h's run.
#
# block_q2_K (84 bytes, 256 weights, 16 sub-blocks of 16):
#     0   u8  scales[16]   sub-block i: low nibble = scale sc_i, high nibble = min m_i
#     16  u8  qs[64]       2-bit q: weight 128*h + 32*s + l is bits 2s..2s+1 of qs[32*h + l]
#     80  f16 d
#     82  f16 dmin
#     w = (d * sc_i) * q - (dmin * m_i),     i = weight // 16
#
# block_q3_K (110 bytes, 256 weights, 16 sub-blocks of 16):
#     0   u8  hmask[32]    weight 128*h + 32*s + l: bit (4*h + s) of hmask[l] is its high bit,
#                          which, when CLEAR, subtracts 4 (q in -4 .. 3)
#     32  u8  qs[64]       low 2 bits, laid out as in q2_K
#     96  u8  scales[12]   16 six-bit scales: scale i = low | high << 4 with
#                            low  = (scales[i % 8] >> (4 * (i // 8))) & 0xF
#                            high = (scales[8 + i % 4] >> (2 * (i // 4))) & 3
#     108 f16 d
#     w = (d * (scale_i - 32)) * q,     i = weight // 16
#
# block_q4_K (144 bytes, 256 weights, 8 sub-blocks of 32):
#     0   f16 d
#     2   f16 dmin
#     4   u8  scales[12]   8 six-bit scales sc_i and mins m_i:
#                            i < 4:  sc = s[i] & 63,                     m = s[i + 4] & 63
#                            i >= 4: sc = (s[i + 4] & 0xF) | (s[i - 4] >> 6) << 4,
#                                    m  = (s[i + 4] >> 4)  | (s[i] >> 6) << 4
#     16  u8  qs[128]      sub-blocks 2j and 2j + 1 are the low and high nibbles of qs[32j .. 32j + 32]
#     w = (d * sc_i) * q - (dmin * m_i),     i = weight // 32
#
# block_q5_K (176 bytes, 256 weights, 8 sub-blocks of 32):
#     0   f16 d
#     2   f16 dmin
#     4   u8  scales[12]   as in q4_K
#     16  u8  qh[32]       bit i of qh[l] is bit 4 of weight 32*i + l
#     48  u8  qs[128]      low four bits, as in q4_K
#     w = (d * sc_i) * q - (dmin * m_i),     i = weight // 32
#
# block_q6_K (210 bytes, 256 weights, 16 sub-blocks of 16):
#     0   u8  ql[128]      low four bits: weight 128*h + 32*s + l is the low (s < 2) or high (s >= 2)
#                          nibble of ql[64*h + 32*(s % 2) + l]
#     128 u8  qh[64]       high two bits: bits 2s..2s+1 of qh[32*h + l]
#     192 i8  scales[16]
#     208 f16 d
#     w = (d * scale_i) * (q - 32),     i = weight // 16


def _k_halves(qs: np.ndarray, fields: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Split [n, 2 * run] bytes into two halves and unpack each with `fields` -> [n, 256]."""
    n = len(qs)
    return fields(qs.reshape(n, 2, -1)).reshape(n, QK_K)


def k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scales and mins of q4_K / q5_K, each [n, 8]."""
    s = scales.reshape(len(scales), 3, 4)
    first, second, third = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([first & 63, (third & 0x0F) | ((first >> 6) << 4)], axis=-1)
    m = np.concatenate([second & 63, (third >> 4) | ((second >> 6) << 4)], axis=-1)
    return sc, m


def _per_sub_block(values: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sub-block values [n, k] and codes [n, 256] -> [n, k, 1] and [n, k, 256 // k], to broadcast."""
    return values.reshape(len(values), values.shape[1], 1), q.reshape(len(q), values.shape[1], -1)


def q2_k_codes(qs: np.ndarray) -> np.ndarray:
    """q2_K's qs[64] (and tq2_0's) -> 2-bit codes [n, 256]."""
    return _k_halves(qs, _crumbs)


def dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    scales = blocks[:, 0:16]
    q = q2_k_codes(blocks[:, 16:80]).astype(np.float32)
    d, dmin = f16_field(blocks, 80), f16_field(blocks, 82)
    dl, q = _per_sub_block(d * (scales & 0x0F).astype(np.float32), q)
    ml = (dmin * (scales >> 4).astype(np.float32))[:, :, None]
    return (dl * q - ml).reshape(len(blocks), QK_K)


def q3_k_codes(blocks: np.ndarray) -> np.ndarray:
    """q3_K's q + 4 (0 .. 7) [n, 256]: the low two bits from qs, the hmask bit as bit 2."""
    n = len(blocks)
    # hmask[l] bit 4h + s belongs to weight 128h + 32s + l: unpack 8 bit-rows of 32 bytes in order.
    high = _bits(blocks[:, 0:32], 8).reshape(n, QK_K)
    return _k_halves(blocks[:, 32:96], _crumbs) | (high << 2)


def q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """q3_K's 16 six-bit scales [n, 16] from scales[12], unsigned (the scale is this - 32)."""
    i = np.arange(16)
    scale_low = (packed[:, i % 8] >> (4 * (i // 8)).astype(np.uint8)) & 0x0F
    scale_high = (packed[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 3
    return scale_low | (scale_high << 4)


def dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    q = q3_k_codes(blocks).astype(np.int8) - np.int8(4)  # a clear hmask bit subtracts 4
    scale = q3_k_scales(blocks[:, 96:108]).astype(np.int8) - np.int8(32)
    dl, q = _per_sub_block(f16_field(blocks, 108) * scale.astype(np.float32), q.astype(np.float32))
    return (dl * q).reshape(n, QK_K)


def _dequantize_q45_k(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Shared tail of q4_K and q5_K: w = (d * sc) * q - (dmin * m) per 32-weight sub-block."""
    sc, m = k_scale_min(blocks[:, 4:16])
    d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)
    dl, q = _per_sub_block(d * sc.astype(np.float32), q.astype(np.float32))
    ml = (dmin * m.astype(np.float32))[:, :, None]
    return (dl * q - ml).reshape(len(blocks), QK_K)


def q4_k_codes(qs: np.ndarray) -> np.ndarray:
    n = len(qs)
    return _nibbles(qs.reshape(n, 4, 32)).reshape(n, QK_K)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    return _dequantize_q45_k(blocks, q4_k_codes(blocks[:, 16:144]))


def q5_k_codes(blocks: np.ndarray) -> np.ndarray:
    high = _bits(blocks[:, 16:48], 8).reshape(len(blocks), QK_K)
    return q4_k_codes(blocks[:, 48:176]) | (high << 4)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    return _dequantize_q45_k(blocks, q5_k_codes(blocks))


def q6_k_codes(blocks: np.ndarray) -> np.ndarray:
    """q6_K's unsigned 6-bit codes (0 .. 63, the weight's q is this - 32) [n, 256]."""
    n = len(blocks)
    # ql as (h, s % 2, l) unpacks to (h, s % 2, nibble, l); weights run over (h, nibble = s // 2, s % 2, l).
    low = _nibbles(blocks[:, 0:128].reshape(n, 2, 2, 32)).transpose(0, 1, 3, 2, 4).reshape(n, QK_K)
    return low | (_k_halves(blocks[:, 128:192], _crumbs) << 4)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    q = q6_k_codes(blocks).astype(np.int8) - np.int8(32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    dl, q = _per_sub_block(f16_field(blocks, 208) * scales, q.astype(np.float32))
    return (dl * q).reshape(n, QK_K)


# --- Ternary types (BitNet b1.58 and TriLMs): 256-weight blocks, one scale ----------------
#
# block_tq1_0 (54 bytes, 256 weights):
#     0   u8  qs[48]   five trits per byte, as the base-3 fraction byte = ceil(256 * v / 243) of the
#                      number v = 81 t0 + 27 t1 + 9 t2 + 3 t3 + t4: trit j of byte b is
#                      ((b * 3^j mod 256) * 3) >> 8. Weight 32j + l (j < 5, l < 32) is trit j of
#                      qs[l]; weight 160 + 16j + l (j < 5, l < 16) is trit j of qs[32 + l]
#     48  u8  qh[4]    four trits per byte, the same way: weight 240 + 4j + l (j < 4, l < 4) is
#                      trit j of qh[l]
#     52  f16 d
#     w = d * (t - 1),     t in {0, 1, 2}     (every byte decodes to trits: no invalid value)
#
# block_tq2_0 (66 bytes, 256 weights):
#     0   u8  qs[64]   2-bit t, laid out as q2_K's qs: weight 128*h + 32*s + l is bits 2s..2s+1
#                      of qs[32*h + l]
#     64  f16 d
#     w = d * (t - 1),     t in {0, 1, 2} (a field of 3, which no quantizer writes, reads as +2)

TRIT_POWERS = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _trits(qs: np.ndarray, count: int) -> np.ndarray:
    """Bytes [n, m] -> trits [n, count, m]: trit j of each byte in row j."""
    digits = qs[:, None, :] * TRIT_POWERS[:count, None]  # uint8: the product wraps mod 256, as in ggml
    return ((digits.astype(np.uint16) * 3) >> 8).astype(np.uint8)


def tq1_0_codes(blocks: np.ndarray) -> np.ndarray:
    """tq1_0's t in {0, 1, 2} [n, 256]."""
    n = len(blocks)
    parts = (_trits(blocks[:, 0:32], 5), _trits(blocks[:, 32:48], 5), _trits(blocks[:, 48:52], 4))
    return np.concatenate([p.reshape(n, -1) for p in parts], axis=1)


def dequantize_tq1_0(blocks: np.ndarray) -> np.ndarray:
    q = tq1_0_codes(blocks).astype(np.int8) - np.int8(1)
    return f16_field(blocks, 52) * q.astype(np.float32)


def dequantize_tq2_0(blocks: np.ndarray) -> np.ndarray:
    q = q2_k_codes(blocks[:, 0:64]).astype(np.int8) - np.int8(1)
    return f16_field(blocks, 64) * q.astype(np.float32)


# --- Unquantized types --------------------------------------------------------------------
#
# F32: IEEE single.  F16: IEEE half.  BF16: the top 16 bits of an IEEE single.


def dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32)


def dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# name -> (weights per block, bytes per block, block dequantizer [n, bytes] -> [n, weights])
BLOCK_TYPES: dict[str, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    "F32": (1, 4, dequantize_f32),
    "F16": (1, 2, dequantize_f16),
    "BF16": (1, 2, dequantize_bf16),
    "Q4_0": (32, 18, dequantize_q4_0),
    "Q4_1": (32, 20, dequantize_q4_1),
    "Q5_0": (32, 22, dequantize_q5_0),
    "Q5_1": (32, 24, dequantize_q5_1),
    "Q8_0": (32, 34, dequantize_q8_0),
    "Q2_K": (QK_K, 84, dequantize_q2_k),
    "Q3_K": (QK_K, 110, dequantize_q3_k),
    "Q4_K": (QK_K, 144, dequantize_q4_k),
    "Q5_K": (QK_K, 176, dequantize_q5_k),
    "Q6_K": (QK_K, 210, dequantize_q6_k),
    "TQ1_0": (QK_K, 54, dequantize_tq1_0),
    "TQ2_0": (QK_K, 66, dequantize_tq2_0),
}


def type_name(ggml_type: str | int | GGMLQuantizationType) -> str:
    """The ggml type's name ("Q4_K") from a name, an enum member or a raw type id."""
    if isinstance(ggml_type, str):
        return ggml_type.upper()
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        raise ValueError(f"unknown ggml tensor type id {int(ggml_type)}") from None


def is_supported(ggml_type: str | int | GGMLQuantizationType) -> bool:
    return type_name(ggml_type) in BLOCK_TYPES


def dequantize(raw: np.ndarray, ggml_type: str | int | GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of a ggml tensor -> float32 tensor of `shape` (row-major; the last dimension is
    the contiguous one, i.e. GGUF's ne[0])."""
    name = type_name(ggml_type)
    if name not in BLOCK_TYPES:
        raise ValueError(
            f"unsupported ggml tensor type {name}: lutlm reads {', '.join(BLOCK_TYPES)}"
        )
    block_weights, block_bytes, dequantize_blocks = BLOCK_TYPES[name]
    shape = tuple(int(d) for d in shape)
    n_weights = int(np.prod(shape))
    if not shape or shape[-1] % block_weights:
        raise ValueError(
            f"a {name} tensor's rows must be whole {block_weights}-weight blocks, but shape is {shape}"
        )
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    n_blocks = n_weights // block_weights
    if raw.size != n_blocks * block_bytes:
        raise ValueError(
            f"a {name} tensor of shape {shape} takes {n_blocks * block_bytes} bytes, got {raw.size}"
        )
    blocks = raw.reshape(n_blocks, block_bytes)
    out = np.empty((n_blocks, block_weights), dtype=np.float32)
    step = max(1, CHUNK_WEIGHTS // block_weights)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        out[start:stop] = dequantize_blocks(blocks[start:stop]).reshape(stop - start, block_weights)
    return torch.from_numpy(out.reshape(shape))
