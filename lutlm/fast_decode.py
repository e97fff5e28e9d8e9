"""One-token decode steps of a packed model with PyTorch out of the loop.

`Transformer.forward` on one token runs about thirty PyTorch operations per layer around
the seven matrix-vector products; each costs microseconds of dispatch however small its
vector, and on a small model (SmolLM2: 30 layers of width 576) that overhead outweighs
the table-lookup kernels. `FastDecoder` computes the same step with two libraries only:
the CPU kernels (lutlm/kernels/cpu) for every linear and the fused helpers of
lutlm/runtime_csrc (norms, rotary embedding, attention, SiLU) for the rest. Their pointer
arguments are bound once to preallocated buffers, so a step allocates nothing and costs
eleven foreign calls per layer.

The KV cache is the model's own: prompts are prefilled by `model.forward` (batched,
where the kernels' GEMM pays) and the following tokens decoded here, or the other way round.
"""

from __future__ import annotations

import ctypes
from functools import partial

import numpy as np
import torch
from torch import nn

from lutlm import decode_ops
from lutlm.embedding import BlockEmbedding
from lutlm.kernels import cpu
from lutlm.linear import PackedLinear
from lutlm.model import Transformer, rope_tables

LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _on_cpu_kernels(module: nn.Module) -> bool:
    return isinstance(module, PackedLinear) and module.backend_name == "cpu"


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` cannot use the fast path, or None if it can."""
    if not isinstance(model, Transformer):
        return f"a {type(model).__name__} is not a lutlm Transformer"
    if not decode_ops.available() or not cpu.available():
        return "the C decode helpers or the CPU kernels are not built"
    embed = model.model.embed_tokens
    floats = [model.model.norm.weight, model.inv_freq] + ([] if isinstance(embed, BlockEmbedding) else [embed.weight])
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in floats):
        return "the model's float tensors are not float32 on the CPU"
    for i, layer in enumerate(model.model.layers):
        for name in LAYER_LINEARS:
            if not _on_cpu_kernels(layer.get_submodule(name)):
                return f"model.layers.{i}.{name} is not a packed linear on the CPU kernels"
    if model.config.head_dim > decode_ops.MAX_HEAD_DIM:
        return f"heads of {model.config.head_dim} values (the decode attention takes up to {decode_ops.MAX_HEAD_DIM})"
    head = model.lm_head
    if not _on_cpu_kernels(head) and not (isinstance(head, nn.Linear) and head.weight.dtype == torch.float32):
        return "lm_head is neither a packed linear on the CPU kernels nor a float32 linear"
    return None


def fast_decoder_for(model: nn.Module) -> FastDecoder | None:
    """A FastDecoder for `model` where it can run, else None (decode through model.forward)."""
    return FastDecoder(model) if unsupported_reason(model) is None else None


def _ptr(t: torch.Tensor, offset_elements: int = 0) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() + offset_elements * t.element_size())


class FastDecoder:
    """`decoder(token, pos)` -> logits [vocab] of the token at position `pos` (batch row 0
    of the model's KV cache, which must hold positions 0..pos-1). The logits tensor is a
    buffer that the next step overwrites. `table_mode` is the kernels' (cpu.MODES); "float"
    makes a step agree with model.forward on the reference backend up to float rounding."""

    def __init__(self, model: Transformer, table_mode: str = "int8"):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the fast decode path cannot run this model: {reason}")
        if table_mode not in cpu.MODES:
            raise ValueError(f"unknown table mode {table_mode!r}; choose one of {', '.join(cpu.MODES)}")
        self.table_mode = cpu.MODES[table_mode]
        c = model.config
        self.model = model
        self.vocab, self.hidden, self.head_dim = c.vocab_size, c.hidden_size, c.head_dim
        self.n_heads, self.n_kv_heads = c.num_attention_heads, c.num_key_value_heads
        attn, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        sizes = dict(x=self.hidden, h=self.hidden, delta=self.hidden, q=attn, k=kv, v=kv, attn=attn,
                     gate=c.intermediate_size, up=c.intermediate_size, act=c.intermediate_size, logits=self.vocab)
        self.buf = {name: torch.zeros(n) for name, n in sizes.items()}
        self.ptr = {name: _ptr(t) for name, t in self.buf.items()}
        self._ops = decode_ops.library()
        self._matmul = cpu.library().lutlm_lut_matmul
        embed = model.model.embed_tokens
        self._block_embed = embed if isinstance(embed, BlockEmbedding) else None
        self._embed = None if self._block_embed else embed.weight.detach().contiguous()
        self._first_norm = self._rmsnorm_call(model.model.layers[0].input_layernorm)
        self._head = self._linear_call(model.lm_head, "h", "logits")
        self._cache_owner: torch.Tensor | None = None  # the k_cache the calls are bound to

    def _linear_call(self, linear: nn.Module, src: str, dst: str):
        if isinstance(linear, PackedLinear):
            return partial(self._matmul, ctypes.pointer(linear.handle.c), self.ptr[src], 1, self.ptr[dst],
                           self.table_mode)
        weight, x, y = linear.weight.detach(), self.buf[src], self.buf[dst]

        def float_matmul() -> None:
            torch.mv(weight, x, out=y)

        return float_matmul

    def _rmsnorm_call(self, norm: nn.Module):
        return partial(self._ops.lutlm_rmsnorm, self.ptr["x"], _ptr(norm.weight.detach()), self.hidden, norm.eps,
                       self.ptr["h"])

    def _add_rmsnorm_call(self, norm: nn.Module):
        return partial(self._ops.lutlm_add_rmsnorm, self.ptr["x"], self.ptr["delta"], _ptr(norm.weight.detach()),
                       self.hidden, norm.eps, self.ptr["h"])

    def _bind_cache(self) -> None:
        """Bind every layer's calls to the current KV cache (setup_cache may have replaced it)."""
        m = self.model
        self.max_seq = m.max_seq_len
        self._cos, self._sin = rope_tables(m.inv_freq, 0, self.max_seq, torch.float32)
        self._scores = torch.zeros(self.n_heads // self.n_kv_heads * self.max_seq)  # a query group's
        self._attend = decode_ops.attend_function(m.model.layers[0].self_attn.k_cache.dtype)
        layers = list(m.model.layers)
        next_norms = [layer.input_layernorm for layer in layers[1:]] + [m.model.norm]
        self._layers = []
        self._matmuls = [self._head]
        for layer, next_norm in zip(layers, next_norms):
            a, mlp = layer.self_attn, layer.mlp
            q, k, v = (self._linear_call(a.q_proj, "h", "q"), self._linear_call(a.k_proj, "h", "k"),
                       self._linear_call(a.v_proj, "h", "v"))
            o = self._linear_call(a.o_proj, "attn", "delta")
            gate, up = self._linear_call(mlp.gate_proj, "h", "gate"), self._linear_call(mlp.up_proj, "h", "up")
            down = self._linear_call(mlp.down_proj, "act", "delta")
            silu_mul = partial(self._ops.lutlm_silu_mul, self.ptr["gate"], self.ptr["up"], mlp.gate_proj.out_features,
                               self.ptr["act"])
            caches = (_ptr(a.k_cache), _ptr(a.v_cache))
            after = [o, self._add_rmsnorm_call(layer.post_attention_layernorm), gate, up, silu_mul, down,
                     self._add_rmsnorm_call(next_norm)]
            self._layers.append(([q, k, v], caches, after))
            self._matmuls += [q, k, v, o, gate, up, down]
        self._cache_owner = layers[0].self_attn.k_cache

    def _bound(self) -> None:
        k_cache = self.model.model.layers[0].self_attn.k_cache
        if k_cache is None:
            raise ValueError("the model has no KV cache; call model.setup_cache first")
        if k_cache is not self._cache_owner:
            self._bind_cache()

    def run_matmuls_only(self) -> None:
        """The step's matrix products alone, on the current buffers: a step's time minus
        this is what the decode path spends outside the kernels (for profiling)."""
        self._bound()
        for call in self._matmuls:
            call()

    @torch.inference_mode()
    def __call__(self, token: int, pos: int) -> torch.Tensor:
        self._bound()
        if not 0 <= pos < self.max_seq:
            raise ValueError(f"position {pos} does not fit the KV cache of {self.max_seq} positions")
        if not 0 <= token < self.vocab:
            raise ValueError(f"token {token} is outside the vocabulary of {self.vocab}")
        if self._block_embed is not None:
            self.buf["x"].copy_(self._block_embed.lookup(np.array([token]))[0])
        else:
            row = self.hidden * 4
            ctypes.memmove(self.ptr["x"], self._embed.data_ptr() + token * row, row)
        self._first_norm()
        cos, sin = _ptr(self._cos, pos * self.head_dim), _ptr(self._sin, pos * self.head_dim)
        p, attend, scores = self.ptr, self._attend, _ptr(self._scores)
        for before, (k_cache, v_cache), after in self._layers:
            if any(call() for call in before):  # the kernels return nonzero on a rejected call
                raise RuntimeError("the CPU kernels rejected a decode-step matmul")
            attend(p["q"], p["k"], p["v"], cos, sin, k_cache, v_cache, self.n_heads, self.n_kv_heads,
                   self.head_dim, self.max_seq, pos, scores, p["attn"])
            if any(call() for call in after):
                raise RuntimeError("the CPU kernels rejected a decode-step matmul")
        if self._head():
            raise RuntimeError("the CPU kernels rejected the output head's matmul")
        return self.buf["logits"]
