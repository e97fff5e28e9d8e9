"""A GGUF's 4-bit linears (Q4_0, Q4_1) as packed weights, without a round trip through float.

Both ggml types are groups of 32 codes with fp16 block constants, which the packed format
(lutlm.formats.packed: w = s * (q - z) per group) holds directly:

    Q4_0:  w = d * (q - 8)        ->  s = d, z = 8                            (exact)
    Q4_1:  w = d * q + m          ->  s = d, z = -m / d rounded to fp16
                                      (d == 0, a constant block: q = 0, s = m, z = -1)

Q4_1's zero is the one rounding: it moves each weight by at most d * |z| * 2^-11, about
1/2000 of the block's offset m, far below the step d of the grid itself. So a Q4_0/Q4_1 GGUF
runs on the table-lookup kernels with the weights llama.cpp runs, not requantized ones.
q/k rows get the same rotary un-permutation as the float path (a permutation of rows).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from lutlm.formats import Checkpoint
from lutlm.formats.ggml_quants import f16_field, q4_codes, type_name
from lutlm.formats.gguf import hf_name, open_gguf, unpermute_rotary
from lutlm.formats.packed import PackedWeight, pack_planes

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}  # fp16 d (and m), then 16 bytes of nibbles


def _block_constants(blocks: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [n_blocks, 32], scale float32 [n_blocks], zero float32 [n_blocks])."""
    d = f16_field(blocks, 0)[:, 0]
    if kind == "Q4_0":
        return q4_codes(blocks[:, 2:18]), d, np.full_like(d, 8.0)
    m = f16_field(blocks, 2)[:, 0]
    codes = q4_codes(blocks[:, 4:20])
    constant = d == 0
    safe_d = np.where(constant, 1.0, d)
    zero = np.where(constant, -1.0, (-m / safe_d).astype(np.float16).astype(np.float32))
    return codes, np.where(constant, m, d), zero


def pack_ggml_4bit(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> PackedWeight:
    """One Q4_0/Q4_1 tensor's raw blocks -> PackedWeight with groups of 32."""
    n, k = shape
    codes, scale, zero = _block_constants(raw.reshape(n * k // BLOCK, BLOCK_BYTES[kind]), kind)
    return PackedWeight(
        planes=pack_planes(torch.from_numpy(np.ascontiguousarray(codes)).reshape(n, k), 4),
        scales=torch.from_numpy(scale.astype(np.float16)).reshape(n, k // BLOCK),
        zeros=torch.from_numpy(zero.astype(np.float16)).reshape(n, k // BLOCK),
        bits=4,
        group_size=BLOCK,
    )


def permute_rows(w: PackedWeight, rows: torch.Tensor) -> PackedWeight:
    return dataclasses.replace(w, planes=w.planes[:, rows], scales=w.scales[rows], zeros=w.zeros[rows])


def pack_gguf_linears(checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint with its Q4_0/Q4_1 decoder-layer linears packed from the GGUF's own
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
        if kind not in BLOCK_BYTES or not name or not name.startswith("model.layers."):
            continue
        n, k = (int(d) for d in reversed(tensor.shape.tolist()))
        weight = pack_ggml_4bit(np.asarray(tensor.data), kind, (n, k))
        for suffix, n_heads in heads.items():
            if name.endswith(suffix):
                rows = unpermute_rotary(torch.arange(n).unsqueeze(1), n_heads).squeeze(1)
                weight = permute_rows(weight, rows)
        packed[name.removesuffix(".weight")] = weight
    tensors = {name: t for name, t in checkpoint.tensors.items() if name.removesuffix(".weight") not in packed}
    return dataclasses.replace(checkpoint, tensors=tensors, packed=packed)
