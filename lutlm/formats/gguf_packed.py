"""A GGUF's quantized tensors as groups of codes with a scale and a zero, without a round trip
through float.

Every common ggml block type is, or holds, groups of integer codes q with one step A and one
offset B (or a fixed zero) per group: w = A * q - B. lutlm's packed form (lutlm.formats.packed:
w = s * (q - z) per group, s and z in fp16) holds such a group directly with s = A and
z = B / A. Per type (lutlm/formats/ggml_quants.py documents each block byte by byte; d, dmin
and m are the blocks' fp16 fields, sc and m their sub-block scales and mins; A and B are the
float32 products ggml's dequantizer forms):

    type   bits  G     ggml's weight                 code q            s             z
    Q4_0   4     32    d * (q - 8)                   q                 d             8
    Q5_0   5     32    d * (q - 16)                  q                 d             16
    Q8_0   8     32    d * q8   (q8 int8)            q8 + 128          d             128
    TQ1_0  2     256   d * (t - 1)                   t (0, 1, 2)       d             1
    TQ2_0  2     256   d * (t - 1)                   t (0 .. 3)        d             1
    Q4_1   4     32    d * q + m                     q                 d             -m / d
    Q5_1   5     32    d * q + m                     q                 d             -m / d
    Q2_K   2     16    (d * sc) * q - (dmin * m)     q                 d * sc        dmin * m / s
    Q4_K   4     32    (d * sc) * q - (dmin * m)     q                 d * sc        dmin * m / s
    Q5_K   5     32    (d * sc) * q - (dmin * m)     q                 d * sc        dmin * m / s
    Q3_K   3     16    (d * (sc - 32)) * q3          q3 + 4            d * (sc - 32) 4
    Q6_K   6     16    (d * sc) * (q - 32)           q                 d * sc        32

G is the group: the block (ternary types: one scale per 256-weight block), or the sub-block
of a K-quant. s and z are stored in fp16, z computed in float32 against the stored s and then
rounded (z = fp16(B / s)); the weight is s * (q - z) evaluated in float32, as
PackedWeight.dequantize and the kernels' reference do. Against gguf-py's dequantization of
the same bytes (A q - B in float32, in ggml's order):

  * Q4_0, Q5_0, Q8_0, TQ1_0, TQ2_0: bit-exact. s = d is already an fp16 value, z an integer,
    and d * (q - z) is the very product ggml takes.
  * Q3_K, Q6_K: s = fp16(A) with A = d * sc (up to 11 + 7 significant bits) rounds once:
    |err| <= (2^-11 + 2^-22) |A (q - z)|. s may be negative (signed sub-scales).
  * Q4_1, Q5_1, Q2_K, Q4_K, Q5_K: s and z round once each (Q4_1/Q5_1's s = d does not):
    |err| <= (2^-11 + 2^-22) (|A q| + |B|), i.e. 2^-11 of the larger of the group's step
    times its code and its offset: within 1/1000 of the group's largest magnitude, far
    below the step A of the grid itself.
  Both bounds hold for normal fp16 s and z; a subnormal one (|s| or |z| < 2^-14) adds at
  most 2^-25 (2^bits + |s|) in absolute terms.
  * A constant group (fp16(A) == 0: a zero sub-scale, d == 0, or |A| < 2^-25) is stored as
    codes 0, z = -1 and s = fp16(mid * A - B), mid = (2^bits - 1) / 2: its value, within
    2^-11 |B| + 2^-25 2^bits.
  * A group whose z would overflow fp16 (an offset more than 65504 steps: a group whose
    spread is under 2^-12 of its offset) is stored as that constant too, within
    1.5 * 2^-11 |B| (mid * |A| < 2^-12 |B| there). No real quantizer writes such a group,
    but one in a 7B model must not stop a load.
  * A step or value that does not fit fp16 at all (|A| >= 65520: d > 500 with a large
    sub-scale, or inf/NaN fields) is refused (ValueError).

The K-quants also have an exact form with their own two-level scales, `ggml_super` (SuperCodes:
fp16 d and dmin per 256 weights, int8 sub-scales and mins per group, w = (d sc) q - dmin m as
ggml forms it, bit-exact), which the CPU's dot kernels keep as it is (fewer bytes to read).

So a GGUF of any of these types (Q4_K_M's Q4_K and Q6_K layers, Q2_K's, TQ2_0 ternary
models) runs on lutlm's kernels with the weights llama.cpp runs, not requantized ones.
TQ2_0 blocks are ternary only if no field holds 3 (which reads as +2 and no quantizer
writes): `ternary` says whether every code is 0, 1 or 2 (TQ1_0 always is).

lutlm.kernels.ggml_native decodes the same groups in C++ (byte-identical codes, scales and
zeros), threaded; `ggml_groups` here is its reference and fallback. q/k rows get the same
rotary un-permutation as the float path (a permutation of rows).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import numpy as np
import torch

from lutlm.formats import Checkpoint, unpacked_tensors
from lutlm.formats.ggml_quants import (
    BLOCK_TYPES, CHUNK_WEIGHTS, f16_field, k_scale_min, q2_k_codes, q3_k_codes, q3_k_scales, q4_codes, q4_k_codes,
    q5_codes, q5_k_codes, q6_k_codes, q8_0_codes, tq1_0_codes, type_name,
)
from lutlm.formats.gguf import hf_name, open_gguf, unpermute_rotary
from lutlm.formats.packed import PackedWeight, pack_planes

GROUP = 32

# Decoder of a chunk of blocks [n, bytes] -> (codes uint8 [n, weights], step A float32 [n, groups],
# offset B float32 [n, groups] or None where the zero is fixed).
Decode = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, "np.ndarray | None"]]


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    bits: int
    group_size: int
    zero: float | None  # the fixed zero, or None: z = B / s per group
    decode: Decode
    ternary: bool = False


def _sub(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)


def _q2_k(b: np.ndarray):
    sc, d, dmin = b[:, 0:16], f16_field(b, 80), f16_field(b, 82)
    return q2_k_codes(b[:, 16:80]), d * _sub(sc & 0x0F), dmin * _sub(sc >> 4)


def _q3_k(b: np.ndarray):
    scale = q3_k_scales(b[:, 96:108]).astype(np.int8) - np.int8(32)
    return q3_k_codes(b), f16_field(b, 108) * _sub(scale), None


def _q45_k(codes: np.ndarray, b: np.ndarray):
    sc, m = k_scale_min(b[:, 4:16])
    return codes, f16_field(b, 0) * _sub(sc), f16_field(b, 2) * _sub(m)


def _q6_k(b: np.ndarray):
    return q6_k_codes(b), f16_field(b, 208) * _sub(b[:, 192:208].view(np.int8)), None


LAYOUTS: dict[str, GroupLayout] = {
    "Q4_0": GroupLayout(4, 32, 8.0, lambda b: (q4_codes(b[:, 2:18]), f16_field(b, 0), None)),
    "Q4_1": GroupLayout(4, 32, None, lambda b: (q4_codes(b[:, 4:20]), f16_field(b, 0), -f16_field(b, 2))),
    "Q5_0": GroupLayout(5, 32, 16.0, lambda b: (q5_codes(b[:, 2:6], b[:, 6:22]), f16_field(b, 0), None)),
    "Q5_1": GroupLayout(5, 32, None,
                        lambda b: (q5_codes(b[:, 4:8], b[:, 8:24]), f16_field(b, 0), -f16_field(b, 2))),
    "Q8_0": GroupLayout(8, 32, 128.0, lambda b: (q8_0_codes(b[:, 2:34]), f16_field(b, 0), None)),
    "Q2_K": GroupLayout(2, 16, None, _q2_k),
    "Q3_K": GroupLayout(3, 16, 4.0, _q3_k),
    "Q4_K": GroupLayout(4, 32, None, lambda b: _q45_k(q4_k_codes(b[:, 16:144]), b)),
    "Q5_K": GroupLayout(5, 32, None, lambda b: _q45_k(q5_k_codes(b), b)),
    "Q6_K": GroupLayout(6, 16, 32.0, _q6_k),
    "TQ1_0": GroupLayout(2, 256, 1.0, lambda b: (tq1_0_codes(b), f16_field(b, 52), None), ternary=True),
    "TQ2_0": GroupLayout(2, 256, 1.0, lambda b: (q2_k_codes(b[:, 0:64]), f16_field(b, 64), None), ternary=True),
}
# kind -> (bits, group size) of its groups.
GROUP_TYPES: dict[str, tuple[int, int]] = {kind: (lay.bits, lay.group_size) for kind, lay in LAYOUTS.items()}
FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")
BLOCKS = {kind: BLOCK_TYPES[kind][:2] for kind in FOUR_BIT}  # weights and bytes per ggml block


@dataclasses.dataclass
class GroupedCodes:
    """One tensor's groups: w[n, k] = scales[n, k // G] * (codes[n, k] - zeros[n, k // G])."""

    codes: np.ndarray   # uint8 [N, K], each < 2^bits
    scales: np.ndarray  # float16 [N, K // group_size]
    zeros: np.ndarray   # float16 [N, K // group_size]
    bits: int
    group_size: int
    ternary: bool = False  # every code is 0, 1 or 2 and every zero 1 (t = code - 1)

    def dequantize(self) -> np.ndarray:
        """s * (q - z) in float32 [N, K], the order PackedWeight.dequantize takes."""
        n, k = self.codes.shape
        q = self.codes.astype(np.float32).reshape(n, k // self.group_size, self.group_size)
        s = self.scales.astype(np.float32)[:, :, None]
        z = self.zeros.astype(np.float32)[:, :, None]
        return (s * (q - z)).reshape(n, k)

    def packed(self) -> PackedWeight:
        """As a PackedWeight (bit-planes): for the bit widths and groups it holds."""
        return PackedWeight(
            planes=pack_planes(torch.from_numpy(np.ascontiguousarray(self.codes)), self.bits),
            scales=torch.from_numpy(self.scales), zeros=torch.from_numpy(self.zeros),
            bits=self.bits, group_size=self.group_size, ternary=self.ternary,
        )


def _fp16(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(np.float16)


def _grid(codes: np.ndarray, step: np.ndarray, offset: np.ndarray | None, zero: float | None,
          bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups w = step * q - offset (or step * (q - zero)), codes [groups, G], step and offset
    float32 [groups] -> (codes, s, z) of w = s * (q - z), s and z as fp16 (see the module's
    docstring for the rules and the bounds; lutlm_ggml_groups in csrc/ggml_decode.cpp does the
    same operations in the same order)."""
    s = _fp16(step)
    if offset is None:
        z = np.full(s.shape, zero, dtype=np.float16)
    else:
        s32 = s.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            z = _fp16(offset / np.where(s32 == 0, np.float32(1), s32))
            constant = (s32 == 0) | np.isinf(z)
            if constant.any():
                value = _fp16(np.float32((2**bits - 1) / 2) * step - offset)
                s = np.where(constant, value, s)
                z = np.where(constant, np.float16(-1), z)
                codes = np.where(constant[:, None], np.uint8(0), codes)
    if not (np.isfinite(s).all() and np.isfinite(z).all()):
        raise ValueError("a block's scale or offset does not fit fp16")
    return codes, s, z


def _check_size(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    if kind not in LAYOUTS:
        raise ValueError(f"ggml type {kind} has no grouped form: lutlm maps {', '.join(LAYOUTS)}")
    if len(shape) != 2:
        raise ValueError(f"a {kind} tensor to group must be 2-D [N, K], got shape {tuple(shape)}")
    n, k = (int(d) for d in shape)
    weights, size = BLOCK_TYPES[kind][:2]
    if n < 0 or k <= 0 or k % weights:
        raise ValueError(f"a {kind} tensor's rows must be whole {weights}-weight blocks, but shape is {(n, k)}")
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size != n * k // weights * size:
        raise ValueError(f"a {kind} tensor of shape {(n, k)} takes {n * k // weights * size} bytes, got {raw.size}")
    return raw, n, k


def ggml_groups(raw: np.ndarray, kind: str | int, shape: tuple[int, int]) -> GroupedCodes:
    """One [N, K] ggml tensor's raw blocks -> its groups (codes, fp16 scales and zeros), numpy."""
    kind = type_name(kind)
    raw, n, k = _check_size(raw, kind, shape)
    lay = LAYOUTS[kind]
    weights, size = BLOCK_TYPES[kind][:2]
    n_blocks, per_block = n * k // weights, weights // lay.group_size
    blocks = raw.reshape(n_blocks, size)
    codes = np.empty((n_blocks, weights), dtype=np.uint8)
    scales = np.empty((n_blocks, per_block), dtype=np.float16)
    zeros = np.empty((n_blocks, per_block), dtype=np.float16)
    step = max(1, CHUNK_WEIGHTS // weights)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        q, a, b = lay.decode(blocks[start:stop])
        groups = (stop - start) * per_block
        q, s, z = _grid(q.reshape(groups, lay.group_size), np.broadcast_to(a, (stop - start, per_block)).reshape(-1),
                        None if b is None else b.reshape(-1), lay.zero, lay.bits)
        codes[start:stop] = q.reshape(stop - start, weights)
        scales[start:stop] = s.reshape(stop - start, per_block)
        zeros[start:stop] = z.reshape(stop - start, per_block)
    ternary = lay.ternary and (kind != "TQ2_0" or not (codes == 3).any())
    return GroupedCodes(codes.reshape(n, k), scales.reshape(n, k // lay.group_size),
                        zeros.reshape(n, k // lay.group_size), lay.bits, lay.group_size, ternary)


# The K-quants' two-level scales as the kernels can keep them (lutlm/kernels/csrc/lutlm.h,
# "Super-block scales"): kind -> (scale layout, fixed zero of the symmetric types or None).
SUPER_TYPES: dict[str, tuple[str, float | None]] = {
    "Q2_K": ("nibble", None), "Q3_K": ("symmetric", 4.0), "Q4_K": ("super", None), "Q5_K": ("super", None),
    "Q6_K": ("symmetric", 32.0),
}
SUPER_WEIGHTS = 256  # weights per K-quant block: one d and dmin each


@dataclasses.dataclass
class SuperCodes:
    """One K-quant tensor with its own two-level scales: per group g of super-block b,
    w = (d[b] * sc[g]) * q - dmin[b] * m[g], exactly the float32 products ggml's dequantizer
    forms. The symmetric types (Q3_K, Q6_K) have no m: w = (d * sc) * (q - zero), and the
    kernels take s z = dmin * sc with dmin = d * zero (exact: zero is a power of two)."""

    codes: np.ndarray        # uint8 [N, K]
    d: np.ndarray            # float16 [N, K // 256]
    dmin: np.ndarray         # float16 [N, K // 256]
    sc: np.ndarray           # int8 [N, K // group_size]
    m: np.ndarray | None     # int8 [N, K // group_size], None for the symmetric types
    bits: int
    group_size: int
    scale_layout: str        # "super", "symmetric" or "nibble" (SUPER_TYPES)
    zero: float | None = None

    @property
    def super_groups(self) -> int:
        return SUPER_WEIGHTS // self.group_size

    def dequantize(self) -> np.ndarray:
        """The float32 weights [N, K], in ggml's order of operations."""
        n, k = self.codes.shape
        per = self.super_groups
        step = self.d.astype(np.float32).repeat(per, axis=1) * self.sc.astype(np.float32)
        q = self.codes.astype(np.float32).reshape(n, k // self.group_size, self.group_size)
        if self.m is None:
            return (step[:, :, None] * (q - np.float32(self.zero))).reshape(n, k)
        offset = self.dmin.astype(np.float32).repeat(per, axis=1) * self.m.astype(np.float32)
        return (step[:, :, None] * q - offset[:, :, None]).reshape(n, k)


def _super_fields(kind: str, b: np.ndarray):
    """Blocks [n, bytes] -> (d, dmin as float16 [n], sc, m as int8 [n, groups]; m None where symmetric)."""
    def half(offset):
        return np.ascontiguousarray(b[:, offset:offset + 2]).view(np.float16)[:, 0]

    if kind == "Q2_K":
        return half(80), half(82), (b[:, 0:16] & 0x0F).astype(np.int8), (b[:, 0:16] >> 4).astype(np.int8)
    if kind in ("Q4_K", "Q5_K"):
        sc, m = k_scale_min(b[:, 4:16])
        return half(0), half(2), sc.astype(np.int8), m.astype(np.int8)
    if kind == "Q3_K":
        d = half(108)
        return d, _fp16(d.astype(np.float32) * 4), q3_k_scales(b[:, 96:108]).astype(np.int8) - np.int8(32), None
    d = half(208)  # Q6_K
    return d, _fp16(d.astype(np.float32) * 32), b[:, 192:208].view(np.int8).copy(), None


def ggml_super(raw: np.ndarray, kind: str | int, shape: tuple[int, int]) -> SuperCodes:
    """One [N, K] K-quant tensor's raw blocks -> its codes and own two-level scales, numpy (the
    reference of lutlm.kernels.ggml_native.super_dot_layout, which lays the same out in C++).
    Codes are ggml_groups' codes with no group flattened."""
    kind = type_name(kind)
    if kind not in SUPER_TYPES:
        raise ValueError(f"ggml type {kind} has no two-level scales: those are {', '.join(SUPER_TYPES)}")
    raw, n, k = _check_size(raw, kind, shape)
    lay = LAYOUTS[kind]
    size = BLOCK_TYPES[kind][1]
    blocks = raw.reshape(-1, size)
    codes = lay.decode(blocks)[0].reshape(n, k)
    d, dmin, sc, m = _super_fields(kind, blocks)
    if not np.isfinite(dmin.astype(np.float32)).all():
        raise ValueError(f"a {kind} block's d times its zero does not fit fp16")
    layout, zero = SUPER_TYPES[kind]
    groups = k // lay.group_size
    return SuperCodes(codes, d.reshape(n, -1), dmin.reshape(n, -1), sc.reshape(n, groups),
                      None if m is None else m.reshape(n, groups), lay.bits, lay.group_size, layout, zero)


def pack_ggml(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> PackedWeight:
    """One tensor's raw blocks -> PackedWeight, for the types whose bit width it holds."""
    from lutlm.kernels.ggml_native import ggml_groups_native

    return ggml_groups_native(raw, kind, shape).packed()


def pack_ggml_4bit(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> PackedWeight:
    """One Q4_0/Q4_1/Q4_K tensor's raw blocks -> PackedWeight with groups of 32."""
    if kind not in FOUR_BIT:
        raise ValueError(f"{kind} is not a 4-bit ggml type ({', '.join(FOUR_BIT)})")
    return pack_ggml(raw, kind, shape)


def permute_rows(w: PackedWeight, rows: torch.Tensor) -> PackedWeight:
    return dataclasses.replace(w, planes=w.planes[:, rows], scales=w.scales[rows], zeros=w.zeros[rows])


def pack_gguf_linears(checkpoint: Checkpoint, kinds: Iterable[str] = FOUR_BIT) -> Checkpoint:
    """The checkpoint with its decoder-layer linears of the ggml types `kinds` (by default the
    4-bit ones, Q4_0/Q4_1/Q4_K) packed from the GGUF's own blocks (other tensors, and linears
    of other types, stay float)."""
    path = checkpoint.source
    if not (os.path.isfile(path) and checkpoint.tensor_types):
        raise ValueError(f"{path}: only a GGUF file's linears can be packed from their ggml blocks")
    kinds = set(kinds)
    if kinds - set(LAYOUTS):
        raise ValueError(
            f"ggml types {sorted(kinds - set(LAYOUTS))} have no grouped form: lutlm maps {', '.join(LAYOUTS)}"
        )
    config = checkpoint.config
    heads = {"self_attn.q_proj.weight": config.num_attention_heads,
             "self_attn.k_proj.weight": config.num_key_value_heads}
    packed = {}
    for tensor in (checkpoint.gguf or open_gguf(path)).tensors:  # the file load_gguf opened
        name = hf_name(tensor.name)
        kind = type_name(tensor.tensor_type)
        if kind not in kinds or not name or not name.startswith("model.layers."):
            continue
        n, k = (int(d) for d in reversed(tensor.shape.tolist()))
        weight = pack_ggml(np.asarray(tensor.data), kind, (n, k))
        for suffix, n_heads in heads.items():
            if name.endswith(suffix):
                rows = unpermute_rotary(torch.arange(n).unsqueeze(1), n_heads).squeeze(1)
                weight = permute_rows(weight, rows)
        packed[name.removesuffix(".weight")] = weight
    return dataclasses.replace(checkpoint, tensors=unpacked_tensors(checkpoint.tensors, packed), packed=packed)
