"""Hugging Face model folders (config.json + *.safetensors + tokenizer.json) -> Checkpoint.

Only safetensors weights are read: pickle checkpoints (pytorch_model.bin) can run code
when loaded, so they are refused rather than unpickled.
"""

from __future__ import annotations

import functools
import glob
import os

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as HFTokenizer

from lutlm.config import ConfigError, ModelConfig, is_whole, shown
from lutlm.formats import Checkpoint, LazyTensors, TokenizerSpec, read_json_object
from lutlm.formats.llama_layout import check_shapes, expected_shapes

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Buffers some older checkpoints saved alongside the weights; the model recomputes them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
FLOAT_STORAGE = ("F16", "BF16", "F32", "F64")  # what a float checkpoint's tensors may be stored as


def _read_json(path: str, required: bool = True) -> dict:
    """A JSON object from `path` ({} if absent and not required); anything else is a one-line error."""
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(f"{path}: not found (a Hugging Face model folder needs it)")
        return {}
    return read_json_object(path)


def _token_ids(value, path: str, key: str) -> list[int]:
    """An id or a list of ids (Hugging Face allows both for eos_token_id), as a list."""
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if not all(is_whole(i) and i >= 0 for i in ids):
        raise ValueError(f"{path}: {key} is {shown(value)}; expected a token id or a list of token ids")
    return ids


def _field(cfg: dict, source: str, key: str, check, expected: str, default=None):
    """cfg[key] (`default` if absent or null) if check(value), else a one-line error naming the key."""
    value = cfg.get(key)
    if value is None:
        return default
    if not check(value):
        raise ValueError(f"{source}: {key} is {shown(value)}; expected {expected}")
    return value


def _config(folder: str, cfg: dict) -> ModelConfig:
    source = os.path.join(folder, "config.json")
    architectures = _field(cfg, source, "architectures", lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
                           "a list of class names", [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        found = f"architectures {', '.join(architectures)}" if architectures else \
            f"no architectures (model_type {shown(cfg.get('model_type'))})"
        raise ValueError(f"{source}: unsupported architecture: {found} (lutlm runs {', '.join(SUPPORTED_ARCHITECTURES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{source}: {flag} is set, but lutlm's Llama has no biases")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {shown(cfg['hidden_act'])} is not supported (lutlm's MLP is SwiGLU)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)}")
    # transformers >= 5 keeps theta and scaling together in rope_parameters; older configs
    # have top-level rope_theta and rope_scaling.
    rope = dict(_field(cfg, source, "rope_parameters", lambda v: isinstance(v, dict), "an object or null", {}))
    theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    generation = _read_json(os.path.join(folder, "generation_config.json"), required=False)
    eos_ids = (_token_ids(cfg.get("eos_token_id"), source, "eos_token_id")
               + _token_ids(generation.get("eos_token_id"), os.path.join(folder, "generation_config.json"), "eos_token_id"))
    name = cfg.get("_name_or_path")

    def optional(key: str, default):  # null is as good as absent, as transformers reads it
        return default if cfg.get(key) is None else cfg[key]

    try:
        return ModelConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=optional("num_key_value_heads", cfg["num_attention_heads"]),
            rms_norm_eps=optional("rms_norm_eps", 1e-6),
            rope_theta=10000.0 if theta is None else theta,
            rope_scaling=scaling,
            max_position_embeddings=optional("max_position_embeddings", 2048),
            tie_word_embeddings=optional("tie_word_embeddings", False),
            head_dim=cfg.get("head_dim"),
            architecture="llama",
            name=name if isinstance(name, str) and name else os.path.basename(os.path.normpath(folder)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=list(dict.fromkeys(eos_ids)),
        )
    except ConfigError as e:
        raise ValueError(f"{source}: {HF_KEYS.get(e.field, e.field)} {e.problem}") from None


# ModelConfig fields that config.json spells otherwise
HF_KEYS = {"eos_token_ids": "eos_token_id", "rope_theta": "rope_theta (or rope_parameters.rope_theta)"}


def _weight_files(folder: str) -> list[str]:
    index_path = os.path.join(folder, SHARD_INDEX)
    if os.path.exists(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not weight_map or not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: weight_map is {shown(weight_map)}; expected an object of tensor name -> file name")
        for name, file in weight_map.items():
            # a shard is a file of this folder: "../x" or "/x" would read a file the folder does not hold
            if not isinstance(file, str) or not file or os.path.basename(file) != file or file in (".", ".."):
                raise ValueError(f"{index_path}: weight_map[{shown(name)}] is {shown(file)}; expected a file name "
                                 "in the model folder")
        files = [os.path.join(folder, f) for f in dict.fromkeys(weight_map.values())]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise FileNotFoundError(f"{index_path}: lists {absent[0]}, which does not exist")
        return files
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
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
            raise ValueError(f"{file}: corrupt safetensors file: {one_line(e)}") from None
        except OSError as e:
            raise ValueError(f"{file}: unreadable safetensors file: {one_line(e)}") from None
    for name, (file, _, dtype) in found.items():
        if dtype not in FLOAT_STORAGE:
            raise ValueError(f"{file}: tensor {name} is stored as {dtype}; expected one of {', '.join(FLOAT_STORAGE)}")
    return found


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a library's may span several), cut short."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else f"{text[:197]}..."


def check_tokenizer_json(path: str, text: str) -> None:
    """Refuse a tokenizer.json that the tokenizers library cannot build, naming the file
    (the library raises a bare Exception whose message names neither)."""
    try:
        HFTokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the library's only exception type
        raise ValueError(f"{path}: not a tokenizer that Hugging Face tokenizers reads: {one_line(e)}") from None


def _chat_template(folder: str, tokenizer_config: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or named templates)."""
    template_file = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(template_file):
        try:
            with open(template_file, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{template_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    source = os.path.join(folder, "tokenizer_config.json")
    chat_template = tokenizer_config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in chat_template):
            raise ValueError(f"{source}: chat_template is {shown(chat_template)}; expected a string or a list of "
                             '{"name": ..., "template": ...}')
        chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
    if chat_template is not None and not isinstance(chat_template, str):
        raise ValueError(f"{source}: chat_template is {shown(chat_template)}; expected a string")
    return chat_template


def _tokenizer(folder: str, config: ModelConfig) -> TokenizerSpec:
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: not found; lutlm needs the tokenizer in Hugging Face tokenizers' tokenizer.json form"
        )
    tokenizer_dict = _read_json(path)  # an object, or a one-line error
    with open(path, encoding="utf-8") as f:
        tokenizer_json = f.read()
    check_tokenizer_json(path, tokenizer_json)
    tokenizer_config = _read_json(os.path.join(folder, "tokenizer_config.json"), required=False)
    bos = config.bos_token_id
    add_bos = _field(tokenizer_config, os.path.join(folder, "tokenizer_config.json"), "add_bos_token",
                     lambda v: isinstance(v, bool), "true, false or null")
    if add_bos is None:
        add_bos = bos is not None and _post_processor_adds(tokenizer_dict.get("post_processor"), bos)
    return TokenizerSpec(
        tokenizer_json=tokenizer_json,
        bos_token_id=bos,
        eos_token_id=config.eos_token_ids[0] if config.eos_token_ids else None,
        add_bos_token=bool(add_bos),
        chat_template=_chat_template(folder, tokenizer_config),
    )


def _post_processor_adds(processor, token_id: int) -> bool:
    """Whether tokenizer.json's post-processor puts `token_id` first (how Llama 3 adds its BOS);
    a post-processor of another shape (the library has built it already) adds nothing here."""
    if not isinstance(processor, dict):
        return False
    if processor.get("type") == "Sequence":
        processors = processor.get("processors")
        return isinstance(processors, list) and any(_post_processor_adds(p, token_id) for p in processors)
    single, special = processor.get("single"), processor.get("special_tokens")
    if processor.get("type") != "TemplateProcessing" or not isinstance(single, list) or not single:
        return False
    first = single[0].get("SpecialToken") if isinstance(single[0], dict) else None
    if not isinstance(first, dict) or not isinstance(special, dict):
        return False
    entry = special.get(first.get("id"))
    return isinstance(entry, dict) and entry.get("ids") == [token_id]


def _read_tensor(file: str, name: str) -> torch.Tensor:
    try:
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(name).to(torch.float32)
    except SafetensorError as e:
        raise ValueError(f"{file}: corrupt safetensors file: {one_line(e)}") from None


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
