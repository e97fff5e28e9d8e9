"""From a path (or nothing: the bundled model) to a ready model and tokenizer."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from lutlm.formats import Checkpoint, load_checkpoint
from lutlm.gguf_linears import gguf_embedding, gguf_linears
from lutlm.kernels import default_backend
from lutlm.linear import replace_linears
from lutlm.model import Transformer, rope_inverse_frequencies
from lutlm.tokenizer import Tokenizer


def default_model_path() -> str:
    from lutlm.formats.gguf import bundled_model_path

    return bundled_model_path()


LAYER_PREFIX = "model.layers."


@contextlib.contextmanager
def skeleton_device(device: str):
    """Build modules whose weights are all assigned afterwards, without initializing them.
    On the CPU their tensors are allocated and never touched (the pages are not resident, and
    go when the loaded weights replace them): that skips the meta device, whose first use
    imports PyTorch's meta registrations (1.4 s of a 2 s load of the bundled model)."""
    resets = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    for cls in resets:
        cls.reset_parameters = lambda self: None
    try:
        with torch.device(device):
            yield
    finally:
        for cls, reset in resets.items():
            cls.reset_parameters = reset


def build_model(checkpoint: Checkpoint, backend: str | None = None, load_layers: bool = True,
                modules: dict[str, nn.Module] | None = None) -> Transformer:
    """A Transformer holding the checkpoint's weights; packed linears go to `backend`, and
    `modules` (module name -> a module already made: a linear laid out from a GGUF's blocks, a
    block embedding) take the place of theirs, whose float weights are then never read.
    `load_layers=False` leaves the decoder layers on the meta device, holding nothing, for
    `load_layer` to fill one at a time (a 7B's layers are 27 GB of float32, one is 0.8 GB)."""
    modules = modules or {}
    config = checkpoint.config
    tied_float_head = config.tie_word_embeddings and "lm_head" not in modules
    if tied_float_head and "model.embed_tokens" in modules:
        raise ValueError("a tied output head needs the float embedding, or a head of its own on the kernels")
    with skeleton_device("cpu" if load_layers else "meta"):
        model = Transformer(config)

    def loaded_now(name: str) -> bool:
        return load_layers or not name.startswith(LAYER_PREFIX)

    skip = {f"{name}.weight" for name in (*checkpoint.packed, *modules)}
    if config.tie_word_embeddings:
        skip.add("lm_head.weight")
    names = [name for name in checkpoint.tensors if name not in skip and loaded_now(name)]
    float_tensors = {name: checkpoint.tensors[name]  # reads a lazily loaded file's tensors here
                     for name in tqdm(names, desc="reading weights", unit="tensor", delay=1.0, leave=False)}
    expected = {k for k in model.state_dict() if k not in skip and loaded_now(k)}
    missing = expected - float_tensors.keys()
    if missing:
        raise ValueError(f"{checkpoint.source}: missing tensors {sorted(missing)[:5]}")
    model.load_state_dict(float_tensors, strict=False, assign=True)
    if tied_float_head:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inverse_frequencies(config)  # buffers built on "meta" hold no data
    if checkpoint.packed:
        replace_linears(model, checkpoint.packed, backend)
    linears = {name: m for name, m in modules.items() if hasattr(m, "in_features")}
    replace_linears(model, linears)
    for name, module in modules.items():
        if name not in linears:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
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


def is_gguf(checkpoint: Checkpoint) -> bool:
    return os.path.isfile(checkpoint.source) and bool(checkpoint.tensor_types)


def load_model(path: str | None = None, backend: str | None = None, progress: bool | None = None,
               layout_cache: str | None = None) -> tuple[Transformer, Tokenizer, Checkpoint]:
    """The model at `path` (default: the bundled one). A GGUF's linears run on `backend`'s
    kernels from their own blocks (lutlm.gguf_linears), the output head included, and on the
    CPU its token embedding stays in its block type (lutlm.embedding); with backend
    "reference" they stay float (dequantized, plain PyTorch: the path to check against).
    `layout_cache`: a folder where a GGUF's CPU layouts are kept, so the next load maps them."""
    checkpoint = load_checkpoint(path or default_model_path())
    model = checkpoint_model(checkpoint, backend, progress, layout_cache)
    return model, Tokenizer(checkpoint.tokenizer), checkpoint


def checkpoint_model(checkpoint: Checkpoint, backend: str | None = None, progress: bool | None = None,
                     layout_cache: str | None = None) -> Transformer:
    """The model of a loaded checkpoint, as load_model builds it (without the tokenizer)."""
    modules = {}
    if is_gguf(checkpoint):
        backend = backend or default_backend("cpu")
        if backend != "reference":
            modules = gguf_linears(checkpoint, backend, progress=progress, layout_cache=layout_cache)
            if backend == "cpu" and "lm_head" in modules:
                modules.update(gguf_embedding(checkpoint))
    return build_model(checkpoint, backend, modules=modules)


def set_threads(n: int | None) -> None:
    """`-t N`: at most the cores this process may use (more threads than cores only wait on each
    other; a thousand would each hold a stack and spin), said in one line when capped."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"-t/--threads must be at least 1, got {n}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n > cores:
        print(f"lutlm: -t {n} is more than the {cores} cores this process may use; using {cores}", file=sys.stderr)
        n = cores
    torch.set_num_threads(n)
    from lutlm.kernels import cpu

    if cpu.available():
        cpu.set_num_threads(n)


def load_for_command(args) -> tuple[Transformer, Tokenizer, Checkpoint]:
    """The model, tokenizer and checkpoint a command runs on (args: -m, -t, --backend,
    --layout-cache), with the threads set. The checkpoint comes back without its packed weights:
    the model holds them in its kernels' layout."""
    from lutlm.fast_decode import unsupported_reason
    from lutlm.linear import linear_summary
    from lutlm.native import return_freed_memory

    set_threads(args.threads)
    start = time.perf_counter()
    layout_cache = getattr(args, "layout_cache", None) or os.environ.get("LUTLM_LAYOUT_CACHE")
    model, tokenizer, checkpoint = load_model(args.model, backend=args.backend, layout_cache=layout_cache)
    if unsupported_reason(model) is None:
        # Every linear runs on the kernels' own thread pool; PyTorch (attention and norms of a
        # prompt) keeps one thread, as `bench e2e` runs it: its OpenMP workers spin-wait after
        # each operation and would take the cores the kernels need.
        torch.set_num_threads(1)
    print(f"loaded {checkpoint.source} in {time.perf_counter() - start:.1f} s: "
          f"{linear_summary(model, checkpoint.tensor_types)}", file=sys.stderr)
    checkpoint = dataclasses.replace(checkpoint, packed={})
    return_freed_memory()
    return model, tokenizer, checkpoint
