"""A packed model folder: what `lutlm quantize -o DIR` writes and `-m DIR` loads, with no
need of the original weights.

    DIR/lutlm.json
        format        "lutlm-packed"
        version       1
        config        ModelConfig fields
        tokenizer     TokenizerSpec fields: a tokenizer.json text or a GGUF vocabulary, and
                      the chat template
        quantization  how the weights were made (method, bits, group sizes, calibration slice)
        packed        {module name: {"bits", "group_size", "ternary"}} for each low-bit linear
    DIR/model.safetensors
        NAME.planes   uint8   [bits, N, K / 8]   bit-planes, layout of lutlm.formats.packed
        NAME.scales   float16 [N, K / G]
        NAME.zeros    float16 [N, K / G]         not written for ternary weights (always 1)
        other tensors under their Hugging Face names: matrices (the embedding, a float
        lm_head) in the chosen float dtype (float16 by default), vectors (norms) in float32.
        A tied lm_head is not written; it is the embedding.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lutlm.config import ModelConfig
from lutlm.formats import Checkpoint, TokenizerSpec
from lutlm.formats.packed import PackedWeight

FORMAT = "lutlm-packed"
VERSION = 1
CONFIG_FILE = "lutlm.json"
TENSOR_FILE = "model.safetensors"
FLOAT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def packed_type_name(w: PackedWeight) -> str:
    """A packed weight's storage type for `lutlm info`, e.g. 'lutlm-4bit-g128'."""
    return f"lutlm-{'ternary' if w.ternary else f'{w.bits}bit'}-g{w.group_size}"


def save_packed_model(directory: str, checkpoint: Checkpoint, float_dtype: str = "float16") -> None:
    """Write a checkpoint with packed linears as a lutlm packed folder."""
    if not checkpoint.packed:
        raise ValueError("the checkpoint has no packed weights; quantize it first")
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float dtype {float_dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
    tensors = {}
    for name, w in checkpoint.packed.items():
        tensors[f"{name}.planes"] = w.planes
        tensors[f"{name}.scales"] = w.scales
        if not w.ternary:
            tensors[f"{name}.zeros"] = w.zeros
    for name, t in checkpoint.tensors.items():
        if name == "lm_head.weight" and checkpoint.config.tie_word_embeddings:
            continue
        dtype = FLOAT_DTYPES[float_dtype] if t.dim() > 1 else torch.float32
        tensors[name] = t.to(dtype)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": checkpoint.config.to_dict(),
        "tokenizer": asdict(checkpoint.tokenizer),
        "quantization": checkpoint.quantization,
        "packed": {
            name: {"bits": w.bits, "group_size": w.group_size, "ternary": w.ternary}
            for name, w in checkpoint.packed.items()
        },
    }
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, TENSOR_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}, so not a lutlm packed model folder")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return meta


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, TENSOR_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no {TENSOR_FILE}")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def load_packed_model(directory: str) -> Checkpoint:
    """Read a packed folder back into a Checkpoint (floats as float32, packed weights as stored)."""
    meta = read_meta(directory)
    tensors = read_tensors(directory)
    packed = {}
    for name, spec in meta["packed"].items():
        fields = {}
        for part in ("planes", "scales", "zeros"):
            key = f"{name}.{part}"
            if key in tensors:
                fields[part] = tensors.pop(key)
            elif part == "zeros" and spec["ternary"]:
                fields[part] = torch.ones_like(fields["scales"])
            else:
                raise ValueError(f"{directory}: tensor {key} is missing from {TENSOR_FILE}")
        try:
            packed[name] = PackedWeight(**fields, bits=spec["bits"], group_size=spec["group_size"],
                                        ternary=spec["ternary"])
        except ValueError as e:
            raise ValueError(f"{directory}: {name}: {e}") from e
    types = {f"{name}.weight": packed_type_name(w) for name, w in packed.items()}
    types.update({name: "F16" if t.dtype == torch.float16 else "F32" for name, t in tensors.items()})
    return Checkpoint(
        config=ModelConfig.from_dict(meta["config"]),
        # Copies: safetensors hands out views of one mapping of the file, which a single kept
        # tensor (a float32 norm weight) would hold whole, packed weights and all.
        tensors={name: t.to(torch.float32, copy=True) for name, t in tensors.items()},
        tokenizer=TokenizerSpec(**meta["tokenizer"]),
        source=directory,
        tensor_types=types,
        packed=packed,
        quantization=meta["quantization"],
    )
