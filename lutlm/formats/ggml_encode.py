"""ggml blocks written from their fields, and a round-to-nearest quantizer for every type
lutlm maps to groups: test files and synthetic GGUFs of types gguf-py cannot quantize.

`encode_blocks` is the inverse of the layouts documented in lutlm/formats/ggml_quants.py:
it takes each block's codes (as lutlm.formats.gguf_packed.ggml_groups returns them: Q8_0's
int8 q as q + 128, Q3_K's q as q + 4, Q6_K's stored 6-bit code, TQ's t) and its fp16 and
sub-block fields, and lays out the bytes. Any codes and fields in range make valid blocks,
so tests can write random ones and check the decoders against gguf-py's.

`quantize` turns float rows into blocks: gguf-py's own quantizer for the types it has
(Q4_0 ... Q8_0, TQ1_0, TQ2_0), and for the K-quants a plain round-to-nearest (per sub-block
min/max or absolute maximum, sub-scales rounded against the super-block's d): not
llama.cpp's error-minimizing search, but valid blocks of real weights, good enough for
end-to-end tests of the formats.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

GGUF_QUANTIZES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _f16(values, n: int) -> np.ndarray:
    """fp16 values [n] as their bytes [n, 2]."""
    return np.broadcast_to(np.asarray(values, dtype=np.float16), (n,)).copy().view(np.uint8).reshape(n, 2)


def _pair_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] codes -> qs[16]: code j < 16 in the low nibble of byte j, code j + 16 in its high one."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _low_nibbles(q: np.ndarray, runs: int) -> np.ndarray:
    """[n, runs * 64] codes -> [n, runs * 32] bytes: run j's first 32 codes low, next 32 high."""
    q = q.reshape(len(q), runs, 2, 32) & 0x0F
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(len(q), runs * 32)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """[n, 256] 2-bit codes -> qs[64]: weight 128 h + 32 s + l is bits 2s..2s+1 of qs[32 h + l]."""
    q = (q.reshape(len(q), 2, 4, 32) & 3).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(len(q), 64)


def _bit_rows(bits: np.ndarray) -> np.ndarray:
    """[n, 8, 32] bits -> [n, 32] bytes, bit i of byte l from row i."""
    return np.bitwise_or.reduce(bits.astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)


def _q5_high(q: np.ndarray) -> np.ndarray:
    """[n, 32] 5-bit codes -> qh[4]: bit j of the little-endian uint32 is bit 4 of code j."""
    bits = ((q >> 4) & 1).astype(np.uint8).reshape(len(q), 4, 8)
    return np.bitwise_or.reduce(bits << np.arange(8, dtype=np.uint8), axis=2)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """q4_K/q5_K's 8 six-bit scales and mins -> scales[12]."""
    out = np.empty((len(sc), 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _q3_scales(u: np.ndarray) -> np.ndarray:
    """q3_K's 16 unsigned six-bit scales -> scales[12] (the inverse of ggml_quants.q3_k_scales)."""
    out = np.zeros((len(u), 12), dtype=np.uint8)
    for i in range(16):
        out[:, i % 8] |= (u[:, i] & 0x0F) << (4 * (i // 8))
        out[:, 8 + i % 4] |= (u[:, i] >> 4) << (2 * (i // 4))
    return out


def _trit_bytes(t: np.ndarray) -> np.ndarray:
    """[n, count, m] trits (trit j of each byte in row j, count 5 or 4) -> [n, m] bytes."""
    powers = np.array([81, 27, 9, 3, 1], dtype=np.uint16)[: t.shape[1], None]
    value = (t.astype(np.uint16) * powers).sum(axis=1)
    return ((value * 256 + 242) // 243).astype(np.uint8)


def _tq1_0(t: np.ndarray) -> np.ndarray:
    n = len(t)
    return np.concatenate([_trit_bytes(t[:, :160].reshape(n, 5, 32)), _trit_bytes(t[:, 160:240].reshape(n, 5, 16)),
                           _trit_bytes(t[:, 240:].reshape(n, 4, 4))], axis=1)


def encode_blocks(kind: str, codes: np.ndarray, d, dmin=None, scales: np.ndarray | None = None,
                  mins: np.ndarray | None = None) -> np.ndarray:
    """Blocks [n, bytes] of ggml type `kind` from their fields:

    codes   uint8 [n, weights]: Q4_*: 0..15, Q5_*: 0..31, Q8_0: q + 128, Q2_K: 0..3, Q3_K: q + 4
            (0..7), Q4_K: 0..15, Q5_K: 0..31, Q6_K: 0..63 (q + 32), TQ1_0: 0..2, TQ2_0: 0..3
    d       [n] fp16 values (the block's scale)
    dmin    [n] fp16: Q4_1/Q5_1's m, the K-quants' dmin
    scales  sub-block scales: Q2_K [n, 16] 0..15, Q3_K [n, 16] 0..63 (the scale is this - 32),
            Q4_K/Q5_K [n, 8] 0..63, Q6_K [n, 16] int8
    mins    sub-block mins: Q2_K [n, 16] 0..15, Q4_K/Q5_K [n, 8] 0..63
    """
    q = np.asarray(codes).astype(np.uint8)
    n = len(q)
    weights, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    if q.shape != (n, weights):
        raise ValueError(f"{kind} codes must be [n, {weights}], got {q.shape}")
    sc = None if scales is None else np.asarray(scales)
    m = None if mins is None else np.asarray(mins).astype(np.uint8)
    if kind == "Q4_0":
        parts = [_f16(d, n), _pair_nibbles(q)]
    elif kind == "Q4_1":
        parts = [_f16(d, n), _f16(dmin, n), _pair_nibbles(q)]
    elif kind == "Q5_0":
        parts = [_f16(d, n), _q5_high(q), _pair_nibbles(q)]
    elif kind == "Q5_1":
        parts = [_f16(d, n), _f16(dmin, n), _q5_high(q), _pair_nibbles(q)]
    elif kind == "Q8_0":
        parts = [_f16(d, n), q ^ np.uint8(0x80)]
    elif kind == "Q2_K":
        parts = [(sc.astype(np.uint8) & 0x0F) | (m << 4), _crumbs(q), _f16(d, n), _f16(dmin, n)]
    elif kind == "Q3_K":
        high = _bit_rows(((q >> 2) & 1).reshape(n, 8, 32))
        parts = [high, _crumbs(q), _q3_scales(sc.astype(np.uint8)), _f16(d, n)]
    elif kind == "Q4_K":
        parts = [_f16(d, n), _f16(dmin, n), _k_scales(sc.astype(np.uint8), m), _low_nibbles(q, 4)]
    elif kind == "Q5_K":
        high = _bit_rows(((q >> 4) & 1).reshape(n, 8, 32))
        parts = [_f16(d, n), _f16(dmin, n), _k_scales(sc.astype(np.uint8), m), high, _low_nibbles(q, 4)]
    elif kind == "Q6_K":
        # weight 128 h + 32 s + l: low nibble -> nibble s // 2 of ql[64 h + 32 (s % 2) + l]
        low = (q & 0x0F).reshape(n, 2, 2, 2, 32)  # (h, s // 2, s % 2, l)
        ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
        parts = [ql, _crumbs(q >> 4), sc.astype(np.int8).view(np.uint8), _f16(d, n)]
    elif kind == "TQ1_0":
        parts = [_tq1_0(q), _f16(d, n)]
    elif kind == "TQ2_0":
        parts = [_crumbs(q), _f16(d, n)]
    else:
        raise ValueError(f"lutlm does not encode ggml type {kind}")
    blocks = np.concatenate([np.asarray(p, dtype=np.uint8).reshape(n, -1) for p in parts], axis=1)
    assert blocks.shape == (n, size), (kind, blocks.shape)
    return blocks


# --- round-to-nearest K-quants ----------------------------------------------------------


def _safe(x: np.ndarray) -> np.ndarray:
    return np.where(x == 0, np.float32(1), x)


def _rtn_min(w: np.ndarray, kind: str, bits: int, group: int, scale_bits: int) -> np.ndarray:
    """Q2_K/Q4_K/Q5_K: per sub-block w ~ step * q - offset, offset = -min(w, 0) >= 0."""
    n = len(w)
    g = w.reshape(n, 256 // group, group)
    low = np.minimum(g.min(-1), 0)
    step = (np.maximum(g.max(-1), low) - low) / (2**bits - 1)
    offset = -low
    top = 2**scale_bits - 1
    d = (step.max(-1) / top).astype(np.float16)
    dmin = (offset.max(-1) / top).astype(np.float16)
    sc = np.clip(np.rint(step / _safe(d.astype(np.float32))[:, None]), 0, top)
    m = np.clip(np.rint(offset / _safe(dmin.astype(np.float32))[:, None]), 0, top)
    a = d.astype(np.float32)[:, None] * sc
    b = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint((g + b[..., None]) / _safe(a)[..., None]), 0, 2**bits - 1)
    q = np.where(a[..., None] == 0, 0, q).reshape(n, 256)
    return encode_blocks(kind, q, d, dmin, sc.astype(np.uint8), m.astype(np.uint8))


def _rtn_symmetric(w: np.ndarray, kind: str, bits: int, top: int) -> np.ndarray:
    """Q3_K/Q6_K: per 16-weight sub-block w ~ (d * sc) * q, the largest magnitude at q = -2^(bits-1)."""
    n = len(w)
    g = w.reshape(n, 16, 16)
    peak = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]
    lowest = -(2 ** (bits - 1))
    step = peak / lowest
    d = (np.abs(step).max(-1) / top).astype(np.float16)
    sc = np.clip(np.rint(step / _safe(d.astype(np.float32))[:, None]), -top - 1, top)
    a = d.astype(np.float32)[:, None] * sc
    q = np.clip(np.rint(g / _safe(a)[..., None]), lowest, -lowest - 1)
    q = np.where(a[..., None] == 0, 0, q).reshape(n, 256) - lowest
    if kind == "Q3_K":
        return encode_blocks(kind, q, d, scales=(sc + 32).astype(np.uint8))
    return encode_blocks(kind, q, d, scales=sc.astype(np.int8))


def quantize(weights: np.ndarray, kind: str) -> np.ndarray:
    """Float rows [N, K] (K whole blocks) -> the raw bytes [N, K / weights * bytes] of `kind`."""
    kind = kind.upper()
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if kind in GGUF_QUANTIZES:
        return gguf_quantize(w, GGMLQuantizationType[kind])
    if kind not in K_QUANTS:
        raise ValueError(
            f"lutlm does not quantize to ggml type {kind}: it writes {', '.join(GGUF_QUANTIZES + K_QUANTS)}"
        )
    n, k = w.shape
    if k % 256:
        raise ValueError(f"a {kind} row must be whole 256-weight super-blocks, got {k} weights")
    rows = w.reshape(-1, 256)
    blocks = {
        "Q2_K": lambda: _rtn_min(rows, kind, 2, 16, 4),
        "Q4_K": lambda: _rtn_min(rows, kind, 4, 32, 6),
        "Q5_K": lambda: _rtn_min(rows, kind, 5, 32, 6),
        "Q3_K": lambda: _rtn_symmetric(rows, kind, 3, 31),
        "Q6_K": lambda: _rtn_symmetric(rows, kind, 6, 127),
    }[kind]()
    return blocks.reshape(n, -1)
