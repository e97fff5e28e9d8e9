"""A GGUF's 4-bit linears (Q4_0, Q4_1, Q4_K) as packed weights, without a round trip through float.

Each of these ggml types is, or holds, groups of 32 codes with one scale and one offset,
which the packed format (lutlm.formats.packed: w = s * (q - z) per group) holds directly:

    Q4_0:  w = d * (q - 8)                  ->  s = d, z = 8                       (exact)
    Q4_1:  w = d * q + m                    ->  s = d, z = -m / d
    Q4_K:  w = (d * sc_i) * q - dmin * m_i  ->  s = d * sc_i, z = dmin * m_i / s  (sub-block i
                                                of 32 in a 256-weight super-block)
    (a constant group, s = 0: q = 0, s = the constant, z = -1)

s and z are stored in fp16, z computed against the stored s: Q4_0 is exact; Q4_1 and Q4_K
move a weight by at most 2^-11 (|s q| + |s z|), within 1/1000 of the group's largest weight
and far below the step s of the grid itself (Q4_1's s = d is already fp16: only z rounds).
So a GGUF of these types, Q4_K_M's Q4_K layers included, runs on the table-lookup kernels
with the weights llama.cpp runs, not requantized ones. q/k rows get the same rotary
un-permutation as the float path (a permutation of rows).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from lutlm.formats import Checkpoint, unpacked_tensors
from lutlm.formats.ggml_quants import f16_field, k_scale_min, q4_codes, q4_k_codes, type_name
from lutlm.formats.gguf import hf_name, open_gguf, unpermute_rotary
from lutlm.formats.packed import PackedWeight, pack_planes

GROUP = 32
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}  # weights and bytes per ggml block


def _grid(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups w = scale * q - offset (float32 [groups]) -> (codes, s, z) of w = s * (q - z), s and
    z as fp16 values, z computed against the rounded s."""
    constant = scale == 0
    s = np.where(constant, -offset, scale).astype(np.float16).astype(np.float32)
    safe_s = np.where(s == 0, 1.0, s)
    z = np.where(constant, -1.0, (offset / safe_s).astype(np.float16).astype(np.float32))
    if not (np.isfinite(s).all() and np.isfinite(z).all()):
        raise ValueError("a block's scale or offset does not fit fp16")
    return np.where(constant[:, None], 0, codes).astype(np.uint8), s, z


def _block_constants(blocks: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [groups, 32], scale float32 [groups], zero float32 [groups])."""
    d = f16_field(blocks, 0)
    if kind == "Q4_0":
        return q4_codes(blocks[:, 2:18]), d[:, 0], np.full(len(blocks), 8.0, dtype=np.float32)
    if kind == "Q4_1":
        return _grid(q4_codes(blocks[:, 4:20]), d[:, 0], -f16_field(blocks, 2)[:, 0])
    sc, m = k_scale_min(blocks[:, 4:16])
    codes = q4_k_codes(blocks[:, 16:144]).reshape(-1, GROUP)
    return _grid(codes, (d * sc).reshape(-1), (f16_field(blocks, 2) * m).reshape(-1))


def pack_ggml_4bit(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> PackedWeight:
    """One Q4_0/Q4_1/Q4_K tensor's raw blocks -> PackedWeight with groups of 32."""
    n, k = shape
    weights, size = BLOCKS[kind]
    codes, scale, zero = _block_constants(raw.reshape(n * k // weights, size), kind)
    return PackedWeight(
        planes=pack_planes(torch.from_numpy(np.ascontiguousarray(codes)).reshape(n, k), 4),
        scales=torch.from_numpy(scale.astype(np.float16)).reshape(n, k // GROUP),
        zeros=torch.from_numpy(zero.astype(np.float16)).reshape(n, k // GROUP),
        bits=4,
        group_size=GROUP,
    )


def permute_rows(w: PackedWeight, rows: torch.Tensor) -> PackedWeight:
    return dataclasses.replace(w, planes=w.planes[:, rows], scales=w.scales[rows], zeros=w.zeros[rows])


def pack_gguf_linears(checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint with its Q4_0/Q4_1/Q4_K decoder-layer linears packed from the GGUF's own
    blocks (other tensors, and linears of other types, stay float)."""
    path = checkpoint.source
    if not (os.path.isfile(path) and checkpoint.tensor_types):
        raise ValueError(f"{path}: only a GGUF file's linears can be packed from their ggml blocks")
    config = checkpoint.config
    heads = {"self_attn.q_proj.weight": config.num_attention_heads,
             "self_attn.k_proj.weight": config.num_key_value_heads}
    packed = {}
    for tensor in open_gguf(path).tensors:
        name = hf_name(tensor.name)
        kind = type_name(tensor.tensor_type)
        if kind not in BLOCKS or not name or not name.startswith("model.layers."):
            continue
        n, k = (int(d) for d in reversed(tensor.shape.tolist()))
        weight = pack_ggml_4bit(np.asarray(tensor.data), kind, (n, k))
        for suffix, n_heads in heads.items():
            if name.endswith(suffix):
                rows = unpermute_rotary(torch.arange(n).unsqueeze(1), n_heads).squeeze(1)
                weight = permute_rows(weight, rows)
        packed[name.removesuffix(".weight")] = weight
    return dataclasses.replace(checkpoint, tensors=unpacked_tensors(checkpoint.tensors, packed), packed=packed)
