"""A GGUF file's linears on lutlm's kernels, straight from their own ggml blocks.

Every block type that holds codes with a scale and an offset per group (Q4_0 ... Q8_0, the
K-quants, the ternary TQ1_0/TQ2_0) maps onto the packed form w = s * (q - z) without
changing a weight (lutlm.formats.gguf_packed.ggml_groups; the native decoder in
lutlm.kernels.ggml_native produces the same bytes). Each tensor is decoded and laid out for
its kernel one at a time, from the memory-mapped file, so a load holds at most one tensor's
codes beside the finished layouts. The output head (the token embedding, where tied) runs
on the kernels in its own type too; the embedding stays float.

Which CPU kernel runs a tensor (table lookup or int8 dot products) is chosen per bit-width
and group size on the machine at hand (lutlm.kernels.choice). A tensor whose type no kernel
takes (F32, F16, BF16) stays float; `plan_linears` says which, and what it costs, before any
weight is read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from lutlm.formats import Checkpoint
from lutlm.formats.gguf import open_gguf, unpermute_rotary
from lutlm.formats.llama_layout import LAYER_TENSORS

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
    from lutlm.formats.gguf_packed import GROUP_TYPES

    shapes = _tensor_shapes(checkpoint)
    plans = []
    for module, tensor in _linear_tensors(checkpoint).items():
        kind = checkpoint.tensor_types[tensor]
        plans.append(LinearPlan(module, tensor, kind, shapes[tensor],
                                kind in GROUP_TYPES and _backend_takes(backend, kind)))
    return plans


def _backend_takes(backend: str, kind: str) -> bool:
    """The cuda kernels take 1 to 4 bits in groups of 32 or more; the CPU kernels every type."""
    from lutlm.formats.gguf_packed import GROUP_TYPES

    if backend != "cuda":
        return True
    bits, group = GROUP_TYPES[kind]
    return bits <= 4 and group % 32 == 0


def _gguf_file(checkpoint: Checkpoint):
    return checkpoint.gguf or open_gguf(checkpoint.source)


def _gguf_tensors(checkpoint: Checkpoint) -> dict:
    from lutlm.formats.gguf import hf_name

    return {hf_name(t.name): t for t in _gguf_file(checkpoint).tensors}


def _tensor_shapes(checkpoint: Checkpoint) -> dict[str, tuple[int, int]]:
    shapes = getattr(checkpoint, "shapes", None)
    if shapes:
        return shapes
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
                 progress: bool | None = None) -> dict:
    """Module name -> PackedLinear on `backend` for every planned linear on the kernels."""
    from lutlm.kernels.ggml_native import ggml_groups_native
    from lutlm.linear import PackedLinear

    plans = [p for p in (plans or plan_linears(checkpoint, backend)) if p.on_kernels]
    gguf_file = _gguf_file(checkpoint)
    tensors = _gguf_tensors(checkpoint)
    linears = {}
    start = time.perf_counter()
    # tqdm's delay: a load that takes under a second shows nothing.
    for plan in tqdm(plans, desc="laying out weights", unit="tensor", delay=1.0, disable=progress is False,
                     leave=False):
        groups = ggml_groups_native(np.asarray(tensors[plan.tensor].data), plan.source_type, plan.shape)
        codes, scales, zeros = (torch.from_numpy(a) for a in (groups.codes, groups.scales, groups.zeros))
        heads = _rotary_heads(checkpoint, plan.module)
        if heads:
            rows = unpermute_rotary(torch.arange(plan.shape[0]).unsqueeze(1), heads).squeeze(1)
            codes, scales, zeros = codes[rows], scales[rows], zeros[rows]
        handle = _prepare(backend, codes, scales, zeros, groups)
        linears[plan.module] = PackedLinear(None, backend, handle=handle, bits=groups.bits,
                                            group_size=groups.group_size, ternary=groups.ternary)
        del codes, scales, zeros, groups
        gguf_file.release(tensors[plan.tensor])
    gguf_linears.last_seconds = time.perf_counter() - start
    return linears


def _prepare(backend: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groups):
    if backend == "cpu":
        from lutlm.kernels import choice, cpu

        kernel = choice.cpu_kernel(groups.bits, groups.group_size, codes.shape[1], groups.ternary)
        return cpu.prepare_codes(codes.contiguous(), scales.contiguous(), zeros.contiguous(), groups.bits,
                                 groups.group_size, kernel=kernel, ternary=groups.ternary)
    from lutlm.formats.packed import PackedWeight, pack_planes
    from lutlm.kernels import get_backend

    weight = PackedWeight(pack_planes(codes, groups.bits), scales, zeros, groups.bits, groups.group_size,
                          groups.ternary)
    return get_backend(backend).prepare(weight)


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
