"""From a path (or nothing: the bundled model) to a ready model and tokenizer."""

from __future__ import annotations

import torch
from tqdm import tqdm

from lutlm.formats import Checkpoint, load_checkpoint
from lutlm.linear import replace_linears
from lutlm.model import Transformer, rope_inverse_frequencies
from lutlm.tokenizer import Tokenizer


def default_model_path() -> str:
    from lutlm.formats.gguf import bundled_model_path

    return bundled_model_path()


LAYER_PREFIX = "model.layers."


def build_model(checkpoint: Checkpoint, backend: str | None = None, load_layers: bool = True) -> Transformer:
    """A Transformer holding the checkpoint's weights; packed linears go to `backend`.
    `load_layers=False` leaves the decoder layers on the meta device, holding nothing, for
    `load_layer` to fill one at a time (a 7B's layers are 27 GB of float32, one is 0.8 GB)."""
    with torch.device("meta"):
        model = Transformer(checkpoint.config)
    skip = {"lm_head.weight"} if checkpoint.config.tie_word_embeddings else set()

    def loaded_now(name: str) -> bool:
        return load_layers or not name.startswith(LAYER_PREFIX)

    names = [name for name in checkpoint.tensors if name not in skip and loaded_now(name)]
    float_tensors = {name: checkpoint.tensors[name]  # reads a lazily loaded file's tensors here
                     for name in tqdm(names, desc="reading weights", unit="tensor", disable=None, leave=False)}
    packed_names = {f"{name}.weight" for name in checkpoint.packed}
    expected = {k for k in model.state_dict() if k not in packed_names and loaded_now(k)}
    if checkpoint.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = expected - float_tensors.keys()
    if missing:
        raise ValueError(f"{checkpoint.source}: missing tensors {sorted(missing)[:5]}")
    model.load_state_dict(float_tensors, strict=False, assign=True)
    if checkpoint.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inverse_frequencies(checkpoint.config)  # buffers built on "meta" hold no data
    if checkpoint.packed:
        replace_linears(model, checkpoint.packed, backend)
    if backend == "cuda" and torch.cuda.is_available():
        model = to_fp16(model, "cuda")
    return model.eval()


def load_layer(model: Transformer, checkpoint: Checkpoint, index: int, device: str | torch.device = "cpu") -> None:
    """Fill decoder layer `index` of a model built with load_layers=False from the checkpoint's
    float tensors, on `device` (a missing tensor is named)."""
    prefix = f"{LAYER_PREFIX}{index}."
    layer = model.model.layers[index]
    state = {name.removeprefix(prefix): checkpoint.tensors[name] for name in checkpoint.tensors if name.startswith(prefix)}
    missing = layer.state_dict().keys() - state.keys()
    if missing:
        raise ValueError(f"{checkpoint.source}: missing tensors {sorted(prefix + name for name in missing)[:5]}")
    layer.load_state_dict(state, assign=True)
    layer.to(device)


def to_fp16(model: Transformer, device: str | torch.device) -> Transformer:
    """Float tensors to fp16 on `device` (the GPU, where the cuda backend's packed linears
    already are); the rotary frequencies stay fp32."""
    inv_freq = model.inv_freq.float()
    model.to(device, torch.float16)
    model.inv_freq = inv_freq.to(device)
    return model


def load_model(path: str | None = None, backend: str | None = None,
               pack_gguf: bool = False) -> tuple[Transformer, Tokenizer, Checkpoint]:
    """`pack_gguf`: a GGUF's Q4_0/Q4_1/Q4_K linears go to the packed kernels from their own blocks."""
    checkpoint = load_checkpoint(path or default_model_path())
    if pack_gguf:
        from lutlm.formats.gguf_packed import pack_gguf_linears

        checkpoint = pack_gguf_linears(checkpoint)
    model = build_model(checkpoint, backend)
    return model, Tokenizer(checkpoint.tokenizer), checkpoint
