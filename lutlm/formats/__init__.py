"""Model file formats: GGUF, Hugging Face folders, and lutlm's packed folders.

Every loader returns a ``Checkpoint``: one config, float tensors under Hugging Face
Llama names, the tokenizer description, and (packed folders only) low-bit weights.

GGUF files and Hugging Face folders hand their float tensors over as ``LazyTensors``: each is
read (and dequantized) from the file when asked for, and not kept. A checkpoint then holds no
weights until a model is built from it, and RTN and ternary quantization, which read one
linear at a time, work on models whose float32 weights would not fit in memory. Loading
still checks every tensor's name, type and shape, so a bad file is refused at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from lutlm.config import ModelConfig
from lutlm.formats.packed import PackedWeight


@dataclass
class TokenizerSpec:
    """What the tokenizer is built from: a tokenizer.json text, or a GGUF vocabulary."""

    tokenizer_json: str | None = None  # Hugging Face tokenizers serialization
    gguf_model: str | None = None  # tokenizer.ggml.model, e.g. "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    gguf_pre: str | None = None  # tokenizer.ggml.pre, the pre-tokenizer name
    tokens: list[str] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    token_types: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos_token: bool = False
    chat_template: str | None = None


# The GGUF vocabularies lutlm.tokenizer builds: byte-level BPE with one of these pre-tokenizers.
GGUF_TOKENIZER_MODELS = ("gpt2",)
GGUF_PRE_TOKENIZERS = ("default", "gpt2", "gpt-2", "smollm", "llama3", "llama-bpe", "llama-v3")


def read_json_object(path: str) -> dict:
    """The JSON object in `path` (a model folder's config.json or lutlm.json); anything else, text
    that is not UTF-8 or JSON nested beyond the parser's depth included, is a one-line ValueError."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deep)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the file holds a JSON {type(value).__name__}; expected an object")
    return value


def check_gguf_vocabulary(spec: TokenizerSpec, source: str, prefix: str) -> None:
    """Refuse a GGUF-style vocabulary that lutlm.tokenizer cannot build, before a model is
    loaded: `prefix` is how the file names the fields ("tokenizer.ggml." in a GGUF)."""
    if spec.gguf_model not in GGUF_TOKENIZER_MODELS:
        raise ValueError(f"{source}: {prefix}model is {spec.gguf_model!r}; lutlm builds byte-level BPE "
                         f"({', '.join(map(repr, GGUF_TOKENIZER_MODELS))}) tokenizers")
    if spec.gguf_pre is not None and spec.gguf_pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{source}: {prefix}pre is {spec.gguf_pre!r}; lutlm supports {', '.join(GGUF_PRE_TOKENIZERS)}")
    if not spec.tokens:
        raise ValueError(f"{source}: {prefix}tokens is empty; expected the vocabulary")
    vocabulary = set(spec.tokens)
    for i, merge in enumerate(spec.merges):
        left, space, right = merge.partition(" ")
        if not space or not left or not right:
            raise ValueError(f"{source}: {prefix}merges[{i}] is {merge[:40]!r}; expected two tokens separated by a space")
        for token in (left, right, left + right):
            if token not in vocabulary:
                raise ValueError(f"{source}: {prefix}merges[{i}] {merge[:40]!r} needs the token {token[:40]!r}, "
                                 "which is not in the vocabulary")


class LazyTensors(Mapping):
    """Name -> float32 tensor, read by `readers[name]()` on every access (nothing is cached)."""

    def __init__(self, readers: dict[str, Callable[[], torch.Tensor]]):
        self._readers = readers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._readers[name]()

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the tensor
        return name in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def unpacked_tensors(tensors: Mapping[str, torch.Tensor],
                     packed: Mapping[str, PackedWeight]) -> dict[str, torch.Tensor]:
    """The float tensors that are not the weight of a linear in `packed` (names without
    ".weight"), each read once: the float part of a checkpoint whose linears were packed."""
    return {name: tensors[name] for name in tensors if name.removesuffix(".weight") not in packed}


@dataclass
class Checkpoint:
    config: ModelConfig
    # Hugging Face Llama names ("model.layers.0.self_attn.q_proj.weight", ...), float32,
    # q/k rows in Hugging Face's rotary layout (GGUF's interleaved layout undone at load);
    # LazyTensors for GGUF files and Hugging Face folders, read when asked for.
    tensors: Mapping[str, torch.Tensor]
    tokenizer: TokenizerSpec
    source: str
    # Storage type of each tensor in the file ("Q4_1", "F32", "lutlm-2bit-g64", ...), for `lutlm info`.
    tensor_types: dict[str, str] = field(default_factory=dict)
    # Low-bit linears by module name ("model.layers.0.mlp.up_proj"), packed folders only.
    packed: dict[str, PackedWeight] = field(default_factory=dict)
    # Free-form description of how the weights were quantized (packed folders only).
    quantization: dict | None = None
    # The parsed GGUF file (a lutlm.formats.gguf_file.GGUFFile; GGUF loads only), so that packing
    # its blocks (gguf_packed.py) reads the file already open instead of parsing it again.
    gguf: object | None = field(default=None, repr=False, compare=False)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a GGUF file, a Hugging Face model folder or a lutlm packed folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "lutlm.json")):
            from lutlm.formats.packed_model import load_packed_model

            return load_packed_model(path)
        from lutlm.formats.hf import load_hf_folder

        return load_hf_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file or folder")
    from lutlm.formats.gguf import load_gguf

    return load_gguf(path)
