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
import shutil
import tempfile
from dataclasses import asdict, fields

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lutlm.config import ConfigError, ModelConfig, is_whole, shown
from lutlm.formats import Checkpoint, TokenizerSpec, check_gguf_vocabulary, read_json_object
from lutlm.formats.llama_layout import LAYER_NAME, check_shapes, expected_shapes
from lutlm.formats.packed import PackedWeight, check_config

FORMAT = "lutlm-packed"
VERSION = 1
CONFIG_FILE = "lutlm.json"
TENSOR_FILE = "model.safetensors"
FILES = (TENSOR_FILE, CONFIG_FILE)  # every file lutlm writes in a packed folder
FLOAT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
PARTS = ("planes", "scales", "zeros")
# Where a folder is written before it is renamed into place: a hidden sibling, so that an
# interrupted write leaves nothing under the name asked for (and nothing a loader looks at).
PARTIAL_PREFIX = ".lutlm-partial-"
REPLACED_PREFIX = ".lutlm-replaced-"


def packed_type_name(w: PackedWeight) -> str:
    """A packed weight's storage type for `lutlm info`, e.g. 'lutlm-4bit-g128'."""
    return f"lutlm-{'ternary' if w.ternary else f'{w.bits}bit'}-g{w.group_size}"


def foreign_files(directory: str) -> list[str]:
    """The entries of an existing folder that are not a packed model lutlm wrote (sorted); [] for a
    folder that holds only lutlm.json (of format lutlm-packed) and model.safetensors, or nothing."""
    entries = sorted(os.listdir(directory))
    foreign = [e for e in entries if e not in FILES or not os.path.isfile(os.path.join(directory, e))
               or os.path.islink(os.path.join(directory, e))]
    if foreign or not entries:
        return foreign
    try:
        read_meta(directory)
    except (ValueError, OSError):
        return entries  # no lutlm.json of lutlm's format: nothing here says lutlm wrote it
    return []


def check_output_folder(directory: str, replace: bool = False) -> None:
    """Refuse, before any work, an output that would lose a file: an existing file, a folder
    that is not empty (unless `replace`, and then only a packed model lutlm wrote), or a place
    where no folder can be made."""
    directory = os.fspath(directory)
    if os.path.islink(directory) or (os.path.exists(directory) and not os.path.isdir(directory)):
        raise ValueError(f"{directory}: exists and is not a folder; the output of quantize is a new folder "
                         "(lutlm never replaces a file)")
    if os.path.isdir(directory) and os.listdir(directory):
        foreign = foreign_files(directory)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise ValueError(f"{directory}: the folder holds {foreign[0]}{more}, which lutlm did not write; "
                             "choose a new or empty folder")
        if not replace:
            raise ValueError(f"{directory}: the folder already holds a packed model; choose a new folder, or pass "
                             "--force to replace it")
    parent = os.path.dirname(os.path.abspath(directory))
    existing = parent
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{directory}: cannot create it ({existing} is not writable)")


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for other threads a moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_mode(kind: str) -> int:
    """The mode a file or folder gets from open()/mkdir() under the umask (tempfile's are
    private, 0600/0700, which a packed folder must not be)."""
    return (0o777 if kind == "folder" else 0o666) & ~_umask()


def save_packed_model(directory: str | os.PathLike, checkpoint: Checkpoint, float_dtype: str = "float16",
                      replace: bool = False) -> None:
    """Write a checkpoint with packed linears as a lutlm packed folder: into a hidden sibling
    first, renamed to `directory` once complete, so that an interrupted write leaves nothing
    that loads. An existing `directory` must be empty, or (with `replace`) hold a packed model
    lutlm wrote, which the new one replaces; anything else is refused (check_output_folder)."""
    directory = os.fspath(directory)
    if not checkpoint.packed:
        raise ValueError("the checkpoint has no packed weights; quantize it first")
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float dtype {float_dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
    check_output_folder(directory, replace)
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
    parent, name = os.path.split(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{name}-", dir=parent)
    try:
        # the mode an existing (empty or replaced) folder has, else a new folder's
        os.chmod(partial, os.stat(directory).st_mode & 0o7777 if os.path.isdir(directory) else _default_mode("folder"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(partial, TENSOR_FILE))
        # lutlm.json last: a folder without it is not taken for a packed model
        with open(os.path.join(partial, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        for file in FILES:
            os.chmod(os.path.join(partial, file), _default_mode("file"))
        _move_into_place(partial, directory, replace)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # the hidden folder this call made, nothing else
        raise


def _move_into_place(partial: str, directory: str, replace: bool) -> None:
    """Rename the complete folder `partial` to `directory`, which is absent, empty, or (checked
    again here, for what changed during the work) a packed model lutlm wrote."""
    check_output_folder(directory, replace)
    directory = os.path.abspath(directory)  # "." or "out/" name the folder itself, for rename(2)
    if not os.path.isdir(directory) or not os.listdir(directory):
        os.replace(partial, directory)  # rename(2) replaces an empty folder
        return
    parent, name = os.path.split(os.path.abspath(directory))
    replaced = tempfile.mkdtemp(prefix=f"{REPLACED_PREFIX}{name}-", dir=parent)
    os.rmdir(replaced)  # a free name beside it for the old folder
    os.rename(directory, replaced)
    try:
        os.rename(partial, directory)
    except BaseException:
        os.rename(replaced, directory)
        raise
    for file in FILES:  # the old packed model: lutlm's own two files, then its folder
        if os.path.isfile(os.path.join(replaced, file)):
            os.remove(os.path.join(replaced, file))
    os.rmdir(replaced)


def _fail(path: str, problem: str):
    raise ValueError(f"{path}: {problem}")


def read_meta(directory: str) -> dict:
    """lutlm.json, checked: a JSON object of the format and version lutlm writes."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}, so not a lutlm packed model folder")
    meta = read_json_object(path)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        _fail(path, f"format {shown(meta.get('format'))} version {shown(meta.get('version'))}, "
                    f"expected {FORMAT!r} version {VERSION}")
    return meta


# TokenizerSpec field -> (check, what lutlm.json must hold there)
TOKENIZER_FIELDS = {
    "tokenizer_json": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "gguf_model": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "gguf_pre": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "tokens": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of strings"),
    "merges": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of strings"),
    "token_types": (lambda v: isinstance(v, list) and all(is_whole(t) for t in v), "a list of integers"),
    "scores": (lambda v: isinstance(v, list) and all(isinstance(t, (int, float)) for t in v), "a list of numbers"),
    "bos_token_id": (lambda v: v is None or is_whole(v), "a token id or null"),
    "eos_token_id": (lambda v: v is None or is_whole(v), "a token id or null"),
    "add_bos_token": (lambda v: isinstance(v, bool), "true or false"),
    "chat_template": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def _tokenizer_spec(value, path: str) -> TokenizerSpec:
    if not isinstance(value, dict):
        _fail(path, f"tokenizer is {shown(value)}; expected an object")
    known = {f.name for f in fields(TokenizerSpec)}
    spec = {}
    for key, item in value.items():
        if key not in known:
            continue  # a field of a later lutlm: not needed to build the tokenizer
        check, expected = TOKENIZER_FIELDS[key]
        if not check(item):
            _fail(path, f"tokenizer.{key} is {shown(item)}; expected {expected}")
        spec[key] = item
    spec = TokenizerSpec(**spec)
    if spec.tokenizer_json:
        from lutlm.formats.hf import check_tokenizer_json

        check_tokenizer_json(f"{path} (tokenizer.tokenizer_json)", spec.tokenizer_json)
    else:
        check_gguf_vocabulary(spec, path, "tokenizer.")
    return spec


def _packed_specs(value, path: str, config: ModelConfig) -> dict[str, tuple[int, int, bool, int, int]]:
    """lutlm.json's "packed": module name -> (bits, group size, ternary, out features, in
    features), each checked against the linears the config has and the packed format."""
    if not isinstance(value, dict):
        _fail(path, f"packed is {shown(value)}; expected an object of module name -> {{bits, group_size, ternary}}")
    linears = {name.removesuffix(".weight"): shape for name, shape in expected_shapes(config).items()
               if len(shape) == 2 and name != "model.embed_tokens.weight"}
    linears["lm_head"] = (config.vocab_size, config.hidden_size)  # packed even where the float head is tied
    specs = {}
    for name, spec in value.items():
        if name not in linears:
            layer = LAYER_NAME.match(f"{name}.")
            if layer and int(layer.group(1)) >= config.num_hidden_layers:
                _fail(path, f"packed names {shown(name)}, a linear of layer {layer.group(1)}, but config.num_hidden_layers "
                            f"is {config.num_hidden_layers}")
            _fail(path, f"packed names {shown(name)}, which is not a linear of this model (e.g. model.layers.0.mlp.up_proj)")
        if not isinstance(spec, dict):
            _fail(path, f"packed[{name!r}] is {shown(spec)}; expected {{\"bits\", \"group_size\", \"ternary\"}}")
        bits, group_size, ternary = spec.get("bits"), spec.get("group_size"), spec.get("ternary", False)
        if not is_whole(bits) or not is_whole(group_size) or not isinstance(ternary, bool):
            _fail(path, f"packed[{name!r}] is {shown(spec)}; expected whole bits and group_size and a bool ternary")
        try:
            check_config(bits, group_size, linears[name][1], ternary)
        except ValueError as e:
            _fail(path, f"packed[{name!r}]: {e}")
        specs[name] = (bits, group_size, ternary, *linears[name])
    return specs


def _tensor_header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in model.safetensors, from its header alone."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, TENSOR_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no {TENSOR_FILE}")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None


def _check_tensors(directory: str, header: dict, specs: dict, config: ModelConfig) -> None:
    """Every tensor of model.safetensors against lutlm.json, from the header: the packed parts'
    shapes and dtypes, the float tensors' shapes, nothing missing and nothing unused."""
    path = os.path.join(directory, TENSOR_FILE)
    shapes, used = {}, set()
    for name, (bits, group_size, ternary, n, k) in specs.items():
        expect = {"planes": ((bits, n, k // 8), "U8"), "scales": ((n, k // group_size), "F16"),
                  "zeros": ((n, k // group_size), "F16")}
        for part in PARTS:
            key = f"{name}.{part}"
            if key not in header:
                if part == "zeros" and ternary:
                    continue
                _fail(directory, f"tensor {key} is missing from {TENSOR_FILE}")
            if header[key] != expect[part]:
                _fail(path, f"tensor {key} has shape {header[key][0]} and dtype {header[key][1]}; expected "
                            f"{expect[part][0]} and {expect[part][1]} (packed as {bits} bits in groups of {group_size})")
            used.add(key)
        shapes[f"{name}.weight"] = (n, k)
    for name, (shape, dtype) in header.items():
        if name in used:
            continue
        if dtype not in ("F16", "F32"):
            _fail(path, f"tensor {name} has dtype {dtype}; expected F16 or F32")
        shapes[name] = shape
    check_shapes(shapes, config, directory)
    expected = set(expected_shapes(config)) | {f"{name}.weight" for name in specs}
    unexpected = sorted(set(shapes) - expected)
    if unexpected:
        _fail(path, f"tensor {unexpected[0]} is not part of the model lutlm.json describes")


def load_packed_model(directory: str) -> Checkpoint:
    """Read a packed folder back into a Checkpoint (floats as float32, packed weights as stored).
    lutlm.json and the tensor file's header are checked in full before any tensor is read."""
    meta = read_meta(directory)
    path = os.path.join(directory, CONFIG_FILE)
    try:
        config = ModelConfig.from_dict(meta.get("config"))
    except ConfigError as e:
        raise ValueError(f"{path}: config.{e.field} {e.problem}") from None
    tokenizer = _tokenizer_spec(meta.get("tokenizer"), path)
    specs = _packed_specs(meta.get("packed"), path, config)
    quantization = meta.get("quantization")
    if quantization is not None and not isinstance(quantization, dict):
        _fail(path, f"quantization is {shown(quantization)}; expected an object or null")
    calibration = (quantization or {}).get("calibration")
    if calibration is not None:  # read by `lutlm ppl` to leave the calibration tokens out
        token_range = calibration.get("token_range") if isinstance(calibration, dict) else None
        if not (isinstance(calibration.get("text") if isinstance(calibration, dict) else None, str)
                and isinstance(token_range, list) and len(token_range) == 2
                and all(is_whole(t) and t >= 0 for t in token_range) and token_range[0] <= token_range[1]):
            _fail(path, f"quantization.calibration is {shown(calibration)}; expected null or "
                        '{"text": a file name, "token_range": [start, end]}')
    tensor_path = os.path.join(directory, TENSOR_FILE)
    if not os.path.exists(tensor_path):
        raise FileNotFoundError(f"{directory}: no {TENSOR_FILE}")
    _check_tensors(directory, _tensor_header(tensor_path), specs, config)
    tensors = read_tensors(directory)
    packed = {}
    for name, (bits, group_size, ternary, _, _) in specs.items():
        parts = {part: tensors.pop(f"{name}.{part}") for part in PARTS if f"{name}.{part}" in tensors}
        if "zeros" not in parts:  # ternary weights: always 1
            parts["zeros"] = torch.ones_like(parts["scales"])
        try:
            packed[name] = PackedWeight(**parts, bits=bits, group_size=group_size, ternary=ternary)
        except ValueError as e:
            raise ValueError(f"{directory}: {name}: {e}") from None
    types = {f"{name}.weight": packed_type_name(w) for name, w in packed.items()}
    types.update({name: "F16" if t.dtype == torch.float16 else "F32" for name, t in tensors.items()})
    return Checkpoint(
        config=config,
        # Copies: safetensors hands out views of one mapping of the file, which a single kept
        # tensor (a float32 norm weight) would hold whole, packed weights and all.
        tensors={name: t.to(torch.float32, copy=True) for name, t in tensors.items()},
        tokenizer=tokenizer,
        source=directory,
        tensor_types=types,
        packed=packed,
        quantization=quantization,
    )
