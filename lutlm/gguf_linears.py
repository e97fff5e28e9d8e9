"""A GGUF file's linears on lutlm's kernels, straight from their own ggml blocks.

Every block type that holds codes with a scale and an offset per group (Q4_0 ... Q8_0, the
K-quants, the ternary TQ1_0/TQ2_0) maps onto the packed form w = s * (q - z) without
changing a weight (lutlm.formats.gguf_packed.ggml_groups; the native decoder in
lutlm.kernels.ggml_native produces the same bytes). Each tensor is decoded and laid out for
its kernel a chunk of rows at a time, from the memory-mapped file whose pages are dropped once
read, so a load holds one chunk's codes beside the finished layouts. The output head (the
token embedding, where tied) runs on the kernels in its own type too; on the CPU the
embedding stays in its blocks (gguf_embedding, lutlm.embedding).

On the CPU the K-quants (Q2_K ... Q6_K) keep their own two-level scales (fp16 d and dmin per
256 weights, integer sub-scales per group: lutlm.formats.gguf_packed.SuperCodes) on the dot
kernels, which then read about the file's bytes instead of an fp16 scale and zero per group.
Which CPU kernel runs another tensor (table lookup or int8 dot products) is chosen per bit-width
and group size on the machine at hand (lutlm.kernels.choice). A tensor whose type no kernel
takes (F32, F16, BF16) stays float; `plan_linears` says which, and what it costs, before any
weight is read.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from lutlm.formats import Checkpoint
from lutlm.formats.gguf import open_gguf, unpermute_rotary
from lutlm.formats.gguf_packed import GROUP_TYPES, SUPER_TYPES, SUPER_WEIGHTS
from lutlm.formats.llama_layout import LAYER_TENSORS

TERNARY_TYPES = ("TQ1_0", "TQ2_0")
LAYER_LINEARS = tuple(name for name in LAYER_TENSORS if name.endswith("_proj"))
HEAD = "lm_head"


@dataclass
class LinearPlan:
    """Where one linear of the file runs."""

    module: str        # "model.layers.0.mlp.up_proj", or "lm_head"
    tensor: str        # the checkpoint tensor it is read from
    source_type: str   # its ggml type, e.g. "Q4_K"
    shape: tuple[int, int]
    on_kernels: bool   # False: it stays a float linear

    @property
    def float_bytes(self) -> int:
        return 4 * self.shape[0] * self.shape[1]


def _linear_tensors(checkpoint: Checkpoint) -> dict[str, str]:
    """Module name -> checkpoint tensor name of every linear, the output head included."""
    names = {}
    for name in checkpoint.tensor_types:
        module = name.removesuffix(".weight")
        if module.startswith("model.layers.") and module.endswith(LAYER_LINEARS):
            names[module] = name
    names[HEAD] = "lm_head.weight" if "lm_head.weight" in checkpoint.tensor_types else "model.embed_tokens.weight"
    return names


def plan_linears(checkpoint: Checkpoint, backend: str) -> list[LinearPlan]:
    """Which of the GGUF's linears go to `backend`'s kernels, read from the header alone."""
    shapes = _tensor_shapes(checkpoint)
    plans = []
    for module, tensor in _linear_tensors(checkpoint).items():
        kind = checkpoint.tensor_types[tensor]
        plans.append(LinearPlan(module, tensor, kind, shapes[tensor],
                                kind in GROUP_TYPES and _backend_takes(backend, kind)))
    return plans


def _backend_takes(backend: str, kind: str) -> bool:
    """The cuda kernels take 1 to 4 bits in groups of 32 or more; the CPU kernels every type."""
    if backend != "cuda":
        return True
    bits, group = GROUP_TYPES[kind]
    return bits <= 4 and group % 32 == 0


def _gguf_file(checkpoint: Checkpoint):
    return checkpoint.gguf or open_gguf(checkpoint.source)


def _gguf_tensors(checkpoint: Checkpoint) -> dict:
    from lutlm.formats.gguf import hf_name

    return {hf_name(t.name): t for t in _gguf_file(checkpoint).tensors}


def _tensor_shapes(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """GGUF lists dimensions innermost first; torch's order is the reverse."""
    return {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in _gguf_tensors(checkpoint).items()}


def _rotary_heads(checkpoint: Checkpoint, module: str) -> int | None:
    """q/k rows are stored in llama.cpp's rotary order: their head count, to undo it."""
    c = checkpoint.config
    if module.endswith("self_attn.q_proj"):
        return c.num_attention_heads
    if module.endswith("self_attn.k_proj"):
        return c.num_key_value_heads
    return None


def gguf_linears(checkpoint: Checkpoint, backend: str, plans: list[LinearPlan] | None = None,
                 progress: bool | None = None, layout_cache: str | None = None) -> dict:
    """Module name -> PackedLinear on `backend` for every planned linear on the kernels.
    `layout_cache`: a folder where the CPU layouts are kept for the next load (lutlm.layout_cache)."""
    from lutlm.linear import PackedLinear

    plans = plans or plan_linears(checkpoint, backend)
    stay_float = [p for p in plans if not p.on_kernels]
    if stay_float:  # said before any weight is read: what the load will cost
        kinds = Counter(p.source_type for p in stay_float)
        print(f"{checkpoint.source}: {len(stay_float)} linears stay float on the {backend} backend "
              f"({', '.join(f'{k} x{n}' for k, n in kinds.most_common())}: "
              f"{sum(p.float_bytes for p in stay_float) / 2**20:.0f} MiB as float32)", file=sys.stderr)
    plans = [p for p in plans if p.on_kernels]
    kernels = {}
    if backend == "cpu":
        from lutlm.kernels import choice

        for p in plans:
            bits, group_size = GROUP_TYPES[p.source_type]
            # The K-quants keep their two-level scales on the dot kernels: fewer bytes to read
            # than either family with an fp16 scale and zero per group.
            kernels[p.module] = "dot" if _super_layout(p, backend) else choice.cpu_kernel(
                bits, group_size, p.shape[1], p.source_type in TERNARY_TYPES)
    cached, cache_file = None, None
    if layout_cache and backend == "cpu":
        from lutlm import layout_cache as lc

        key = lc.cache_key(checkpoint.source, [(p.module, kernels[p.module], *GROUP_TYPES[p.source_type],
                                                 _super_layout(p, backend) or "f16") for p in plans])
        cache_file = lc.cache_path(layout_cache, checkpoint.source, key)
        cached = lc.read(cache_file, key)
        if cached is not None and set(cached) != {p.module for p in plans}:
            cached = None
    if cached is not None:
        return {module: PackedLinear(None, backend, handle=h, bits=bits, group_size=g, ternary=t)
                for module, (h, bits, g, t) in cached.items()}
    gguf_file = _gguf_file(checkpoint)
    tensors = _gguf_tensors(checkpoint)
    linears = {}
    # tqdm's delay: a load that takes under a second shows nothing.
    for plan in tqdm(plans, desc="laying out weights", unit="tensor", delay=1.0, disable=progress is False,
                     leave=False):
        bits, group_size = GROUP_TYPES[plan.source_type]
        ternary = plan.source_type in TERNARY_TYPES
        if _super_layout(plan, backend):
            handle = _super_dot_linear(checkpoint, gguf_file, tensors[plan.tensor], plan)
            linears[plan.module] = PackedLinear(None, backend, handle=handle, bits=bits, group_size=group_size)
            continue
        chunks = _code_chunks(checkpoint, gguf_file, tensors[plan.tensor], plan)
        if backend == "cpu":
            from lutlm.kernels import cpu

            handle = cpu.prepare_code_rows(*plan.shape, bits, group_size, chunks, kernels[plan.module], ternary)
        else:
            from lutlm.formats.packed import PackedWeight, pack_planes
            from lutlm.kernels import get_backend

            codes, scales, zeros = (torch.cat(parts) for parts in zip(*chunks))
            weight = PackedWeight(pack_planes(codes, bits), scales, zeros, bits, group_size, ternary)
            handle = get_backend(backend).prepare(weight)
        linears[plan.module] = PackedLinear(None, backend, handle=handle, bits=bits, group_size=group_size,
                                            ternary=ternary)
    if cache_file:
        from lutlm import layout_cache as lc

        try:
            os.makedirs(layout_cache, exist_ok=True)
            lc.write(cache_file, key, {m: (lin.handle, lin.bits, lin.group_size, lin.ternary)
                                       for m, lin in linears.items()})
        except OSError as e:  # the model is loaded: a cache that cannot be written only costs the next load
            print(f"lutlm: could not keep the layout in {layout_cache}: {e.strerror or e}", file=sys.stderr)
    return linears


def _super_layout(plan: LinearPlan, backend: str) -> str | None:
    """The two-level scale layout a K-quant linear keeps on the CPU kernels, else None."""
    if backend != "cpu" or plan.source_type not in SUPER_TYPES or plan.shape[1] % SUPER_WEIGHTS:
        return None
    return SUPER_TYPES[plan.source_type][0]


def _super_dot_linear(checkpoint: Checkpoint, gguf_file, tensor, plan: LinearPlan):
    """A K-quant tensor straight from its blocks into the dot kernels' layout with its own
    two-level scales (native, a tile at a time: no tensor of codes), q/k rows in Hugging Face's
    rotary order; the file's pages are dropped once read."""
    from lutlm.kernels.ggml_native import super_dot_layout

    n, _ = plan.shape
    raw = np.asarray(tensor.data).reshape(n, -1)
    heads = _rotary_heads(checkpoint, plan.module)
    row_of = None
    if heads:
        row_of = unpermute_rotary(torch.arange(n).unsqueeze(1), heads).squeeze(1).numpy()
    handle = super_dot_layout(raw, plan.source_type, plan.shape, row_of)
    gguf_file.release_range(tensor.data_offset, raw.nbytes)
    return handle


CHUNK_ROWS = 2048  # rows decoded and laid out at a time: 8 MiB of codes at K = 4096


def _code_chunks(checkpoint: Checkpoint, gguf_file, tensor, plan: LinearPlan):
    """(codes, scales, zeros) of the tensor's rows, CHUNK_ROWS at a time (whole tiles of 16 rows,
    whole heads for q/k, whose rows are put back in Hugging Face's rotary order within each
    head); each chunk's file pages are dropped from memory once it is decoded."""
    from lutlm.kernels.ggml_native import ggml_groups_native

    n, k = plan.shape
    raw = np.asarray(tensor.data).reshape(n, -1)  # one row's blocks per row
    row_bytes = raw.shape[1]
    heads = _rotary_heads(checkpoint, plan.module)
    head_rows = n // heads if heads else 1
    unit = math.lcm(16, head_rows)
    step = max(unit, CHUNK_ROWS // unit * unit)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        groups = ggml_groups_native(raw[r0:r1], plan.source_type, (r1 - r0, k))
        codes, scales, zeros = (torch.from_numpy(a) for a in (groups.codes, groups.scales, groups.zeros))
        if heads:
            rows = unpermute_rotary(torch.arange(r1 - r0).unsqueeze(1), (r1 - r0) // head_rows).squeeze(1)
            codes, scales, zeros = codes[rows], scales[rows], zeros[rows]
        gguf_file.release_range(tensor.data_offset + r0 * row_bytes, (r1 - r0) * row_bytes)
        yield codes, scales, zeros


FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_embedding(checkpoint: Checkpoint) -> dict:
    """{"model.embed_tokens": BlockEmbedding} where the file's embedding is in a block type,
    else nothing (a float embedding is read as it is)."""
    from lutlm.embedding import BlockEmbedding

    name = "model.embed_tokens.weight"
    kind = checkpoint.tensor_types.get(name)
    if kind is None or kind in FLOAT_TYPES:
        return {}
    tensor = _gguf_tensors(checkpoint)[name]
    return {"model.embed_tokens": BlockEmbedding(np.asarray(tensor.data), kind, _tensor_shapes(checkpoint)[name])}
