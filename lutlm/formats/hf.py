"""Hugging Face model folders (config.json + *.safetensors + tokenizer.json) -> Checkpoint.

Only safetensors weights are read: pickle checkpoints (pytorch_model.bin) can run code
when loaded, so they are refused rather than unpickled.
"""

from __future__ import annotations

import functools
import glob
import json
import os

import torch
from safetensors import SafetensorError, safe_open

from lutlm.config import ModelConfig
from lutlm.formats import Checkpoint, LazyTensors, TokenizerSpec
from lutlm.formats.llama_layout import check_shapes, expected_shapes

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Buffers some older checkpoints saved alongside the weights; the model recomputes them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_json(path: str, required: bool = True) -> dict:
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(f"{path}: not found (a Hugging Face model folder needs it)")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, list) else [int(ids)]


def _config(folder: str, cfg: dict) -> ModelConfig:
    source = os.path.join(folder, "config.json")
    architectures = cfg.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        found = ", ".join(architectures) or f"model_type {cfg.get('model_type')!r}"
        raise ValueError(f"{source}: unsupported architecture {found} (lutlm runs {', '.join(SUPPORTED_ARCHITECTURES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{source}: {flag} is set, but lutlm's Llama has no biases")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (lutlm's MLP is SwiGLU)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in cfg]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)}")
    # transformers >= 5 keeps theta and scaling together in rope_parameters; older configs
    # have top-level rope_theta and rope_scaling.
    rope = dict(cfg.get("rope_parameters") or {})
    theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    generation = _read_json(os.path.join(folder, "generation_config.json"), required=False)
    eos_ids = _as_list(cfg.get("eos_token_id")) + _as_list(generation.get("eos_token_id"))
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=cfg.get("head_dim"),
        architecture="llama",
        name=cfg.get("_name_or_path") or os.path.basename(os.path.normpath(folder)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
    )


def _weight_files(folder: str) -> list[str]:
    index_path = os.path.join(folder, SHARD_INDEX)
    if os.path.exists(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index_path}: no weight_map")
        files = [os.path.join(folder, f) for f in dict.fromkeys(weight_map.values())]
        absent = [f for f in files if not os.path.exists(f)]
        if absent:
            raise FileNotFoundError(f"{index_path}: lists {absent[0]}, which does not exist")
        return files
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    pickles = sorted(p for pattern in PICKLE_PATTERNS for p in glob.glob(os.path.join(folder, pattern)))
    if pickles:
        raise ValueError(
            f"{folder}: only pickle checkpoints ({os.path.basename(pickles[0])}) found; lutlm refuses pickle files "
            f"because loading them can run arbitrary code. Convert the weights to safetensors."
        )
    raise FileNotFoundError(f"{folder}: no {SINGLE_FILE} or {SHARD_INDEX}")


def _tensor_index(files: list[str]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Name -> (file, shape, storage dtype such as "BF16") for every tensor, from the headers alone."""
    found = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    info = f.get_slice(name)
                    found[name] = (file, tuple(info.get_shape()), info.get_dtype())
        except SafetensorError as e:
            raise ValueError(f"{file}: corrupt safetensors file: {e}") from None
    return found


def _tokenizer(folder: str, config: ModelConfig) -> TokenizerSpec:
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: not found; lutlm needs the tokenizer in Hugging Face tokenizers' tokenizer.json form"
        )
    with open(path, encoding="utf-8") as f:
        tokenizer_json = f.read()
    tokenizer_config = _read_json(os.path.join(folder, "tokenizer_config.json"), required=False)
    template_file = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(template_file):
        with open(template_file, encoding="utf-8") as f:
            chat_template = f.read()
    else:
        chat_template = tokenizer_config.get("chat_template")
        if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in chat_template}
            chat_template = named.get("default")
    bos = config.bos_token_id
    add_bos = tokenizer_config.get("add_bos_token")
    if add_bos is None:
        add_bos = bos is not None and _post_processor_adds(json.loads(tokenizer_json).get("post_processor"), bos)
    return TokenizerSpec(
        tokenizer_json=tokenizer_json,
        bos_token_id=bos,
        eos_token_id=config.eos_token_ids[0] if config.eos_token_ids else None,
        add_bos_token=bool(add_bos),
        chat_template=chat_template,
    )


def _post_processor_adds(processor: dict | None, token_id: int) -> bool:
    """Whether tokenizer.json's post-processor puts `token_id` first (how Llama 3 adds its BOS)."""
    if not processor:
        return False
    if processor.get("type") == "Sequence":
        return any(_post_processor_adds(p, token_id) for p in processor.get("processors", []))
    if processor.get("type") != "TemplateProcessing" or not processor.get("single"):
        return False
    first = processor["single"][0].get("SpecialToken")
    return first is not None and processor["special_tokens"].get(first["id"], {}).get("ids") == [token_id]


def _read_tensor(file: str, name: str) -> torch.Tensor:
    try:
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(name).to(torch.float32)
    except SafetensorError as e:
        raise ValueError(f"{file}: corrupt safetensors file: {e}") from None


def load_hf_folder(path: str | os.PathLike) -> Checkpoint:
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such model folder")
    config = _config(folder, _read_json(os.path.join(folder, "config.json")))
    tokenizer = _tokenizer(folder, config)
    index = _tensor_index(_weight_files(folder))
    index = {name: entry for name, entry in index.items() if not name.endswith(IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        index.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    check_shapes({name: shape for name, (_, shape, _) in index.items()}, config, folder)
    unexpected = sorted(set(index) - set(expected_shapes(config)))
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensor {unexpected[0]} (not part of the Llama layout lutlm runs)")

    tensors = LazyTensors({name: functools.partial(_read_tensor, file, name) for name, (file, _, _) in index.items()})
    tensor_types = {name: dtype for name, (_, _, dtype) in index.items()}
    return Checkpoint(config=config, tensors=tensors, tokenizer=tokenizer, source=folder, tensor_types=tensor_types)
