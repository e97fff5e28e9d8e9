"""One-token decode steps of a packed model with PyTorch out of the loop.

`Transformer.forward` on one token runs about thirty PyTorch operations per layer around
the seven matrix-vector products; each costs microseconds of dispatch however small its
vector, and on a small model (SmolLM2: 30 layers of width 576) that overhead outweighs
the table-lookup kernels. `FastDecoder` computes the same step with two libraries only:
the CPU kernels (lutlm/kernels/cpu) for every linear and the fused helpers of
lutlm/runtime_csrc (norms, rotary embedding, attention, SiLU) for the rest. Their pointer
arguments are bound once to preallocated buffers, so a step allocates nothing and costs
eleven foreign calls per layer.

A step takes B rows, each a token of some sequence (the serving engine's batch: the next token
of every running sequence, and chunks of prompts): every linear runs once on all B rows, so the
weights are read once for all of them, and the attention of each row runs over its own slot of
the caller's KVCache. `Generator` prefills prompts with `model.forward` into the same cache
instead, and decodes the following tokens here.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from torch import nn

from lutlm import decode_ops
from lutlm.embedding import BlockEmbedding
from lutlm.kernels import cpu
from lutlm.linear import PackedLinear
from lutlm.kv_cache import KVCache
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


def invariant_rows(linear: PackedLinear, table_mode: str = "int8", probe_rows: int = 8) -> int:
    """The fewest rows from which the kernels compute each row of `linear`'s product the same way
    whatever the batch size (1: any batch). Found by running random rows at every batch size up to
    `probe_rows`, so that it follows the kernels' own choice of GEMV and GEMM paths."""
    x = torch.randn(probe_rows, linear.in_features, generator=torch.Generator().manual_seed(0))
    full = cpu.matmul(x, linear.handle, table_mode)
    rows = probe_rows
    while rows > 1 and torch.equal(cpu.matmul(x[:rows - 1], linear.handle, table_mode), full[:rows - 1]):
        rows -= 1
    return rows


def _ptr(t: torch.Tensor, offset_elements: int = 0) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() + offset_elements * t.element_size())


class FastDecoder:
    """`decoder(token, pos, cache)` -> logits [vocab] of the token at position `pos` of slot 0
    of `cache` (default: the model's setup_cache one), which must hold positions 0..pos-1;
    `decoder.step(tokens, positions, cache, slots)` -> logits [B, vocab] of B <= max_batch rows,
    row b the token at position positions[b] of slot slots[b]. Rows are taken in order, each
    attending over its slot as left by the rows before it, so that one step can hold the next
    token of several sequences and a chunk of a prompt (consecutive positions of one slot).
    `logit_rows`: the rows whose logits are wanted (default all), which the output head runs on.
    The logits are a buffer that the next step overwrites.

    `table_mode` is the kernels' (cpu.MODES); "float" makes a step agree with model.forward on
    the reference backend up to float rounding. `batch_invariant`: each row's logits do not depend
    on the other rows of its step. The kernels compute one row with their GEMV and several with
    their GEMM (4-bit table-lookup weights: from 4 rows on), whose float epilogues round
    differently; so each packed product then runs on at least as many rows as its kernel needs
    to compute every row the same way whatever the batch (invariant_rows), the extra rows ignored."""

    def __init__(self, model: Transformer, table_mode: str = "int8", max_batch: int = 1,
                 batch_invariant: bool = False):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the fast decode path cannot run this model: {reason}")
        if table_mode not in cpu.MODES:
            raise ValueError(f"unknown table mode {table_mode!r}; choose one of {', '.join(cpu.MODES)}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.table_mode = cpu.MODES[table_mode]
        c = model.config
        self.model = model
        self.max_batch = max_batch
        self.min_rows = {}  # packed linear -> rows its products run on at least (batch_invariant)
        if batch_invariant:
            probed = {}  # linears of one kernel, format and shape take the same paths: probe one of them
            for m in model.modules():
                if isinstance(m, PackedLinear):
                    kind = (m.kernel, m.bits, m.group_size, m.ternary, m.in_features, m.out_features)
                    if kind not in probed:
                        probed[kind] = invariant_rows(m, table_mode)
                    self.min_rows[m] = probed[kind]
        self.vocab, self.hidden, self.head_dim = c.vocab_size, c.hidden_size, c.head_dim
        self.n_heads, self.n_kv_heads = c.num_attention_heads, c.num_key_value_heads
        attn, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        sizes = dict(x=self.hidden, h=self.hidden, head_in=self.hidden, delta=self.hidden, q=attn, k=kv, v=kv,
                     attn=attn, gate=c.intermediate_size, up=c.intermediate_size, act=c.intermediate_size,
                     logits=self.vocab)
        rows = max([max_batch, *self.min_rows.values()])
        self.buf = {name: torch.zeros(rows, n) for name, n in sizes.items()}
        self.ptr = {name: _ptr(t) for name, t in self.buf.items()}
        self._slots = np.zeros(max_batch, dtype=np.int64)  # the attention's per-row slot and position
        self._positions = np.zeros(max_batch, dtype=np.int64)
        self._ops = decode_ops.library()
        self._matmul = cpu.library().lutlm_lut_matmul
        embed = model.model.embed_tokens
        self._block_embed = embed if isinstance(embed, BlockEmbedding) else None
        self._embed = None if self._block_embed else embed.weight.detach().contiguous()
        self._first_norm = self._rmsnorm_call(model.model.layers[0].input_layernorm)
        self._head = self._linear_call(model.lm_head, "head_in", "logits")
        self._cache: KVCache | None = None  # the cache the attention calls are bound to

    def _linear_call(self, linear: nn.Module, src: str, dst: str):
        """A product over the first rows of buffer src into dst: call(batch) -> nonzero if rejected."""
        if isinstance(linear, PackedLinear):
            matmul, handle, x, y, mode = self._matmul, ctypes.pointer(linear.handle.c), self.ptr[src], self.ptr[dst], \
                self.table_mode
            min_rows = self.min_rows.get(linear, 1)

            def packed_matmul(batch: int) -> int:
                return matmul(handle, x, max(batch, min_rows), y, mode)

            return packed_matmul
        weight, x, y = linear.weight.detach(), self.buf[src], self.buf[dst]

        def float_matmul(batch: int) -> None:
            for row in range(batch):  # row by row: PyTorch's GEMM rounds a row differently from its GEMV
                torch.mv(weight, x[row], out=y[row])

        return float_matmul

    def _rmsnorm_call(self, norm: nn.Module):
        rmsnorm, x, weight, n, eps, h = self._ops.lutlm_rmsnorm_rows, self.ptr["x"], _ptr(norm.weight.detach()), \
            self.hidden, norm.eps, self.ptr["h"]

        def call(batch: int) -> None:
            rmsnorm(x, weight, batch, n, eps, h)

        return call

    def _add_rmsnorm_call(self, norm: nn.Module):
        add_rmsnorm, x, delta, weight = self._ops.lutlm_add_rmsnorm_rows, self.ptr["x"], self.ptr["delta"], \
            _ptr(norm.weight.detach())
        n, eps, h = self.hidden, norm.eps, self.ptr["h"]

        def call(batch: int) -> None:
            add_rmsnorm(x, delta, weight, batch, n, eps, h)

        return call

    def _silu_mul_call(self, width: int):
        silu_mul, gate, up, act = self._ops.lutlm_silu_mul, self.ptr["gate"], self.ptr["up"], self.ptr["act"]

        def call(batch: int) -> None:
            silu_mul(gate, up, batch * width, act)

        return call

    def _bind(self, cache: KVCache) -> None:
        """Bind every layer's calls to `cache` (a decoder serves one cache at a time)."""
        if cache.dtype not in decode_ops.CACHE_DTYPES or cache.device.type != "cpu":
            raise ValueError(f"the fast decode path takes a float32 or float16 KV cache on the CPU, "
                             f"not {cache.dtype} on {cache.device}")
        m = self.model
        self.max_seq = cache.max_seq
        self._cos, self._sin = rope_tables(m.inv_freq, 0, self.max_seq, torch.float32)
        self._scores = torch.zeros(self.n_heads // self.n_kv_heads * self.max_seq)  # a query group's
        self._attend = decode_ops.attend_function(cache.dtype, rows=True)
        self._slot_stride = self.n_kv_heads * self.max_seq * self.head_dim
        layers = list(m.model.layers)
        next_norms = [layer.input_layernorm for layer in layers[1:]] + [m.model.norm]
        self._layers = []
        self._matmuls = [self._head]
        for layer, next_norm, k_cache, v_cache in zip(layers, next_norms, cache.keys, cache.values):
            a, mlp = layer.self_attn, layer.mlp
            q, k, v = (self._linear_call(a.q_proj, "h", "q"), self._linear_call(a.k_proj, "h", "k"),
                       self._linear_call(a.v_proj, "h", "v"))
            o = self._linear_call(a.o_proj, "attn", "delta")
            gate, up = self._linear_call(mlp.gate_proj, "h", "gate"), self._linear_call(mlp.up_proj, "h", "up")
            down = self._linear_call(mlp.down_proj, "act", "delta")
            after = [o, self._add_rmsnorm_call(layer.post_attention_layernorm), gate, up,
                     self._silu_mul_call(mlp.gate_proj.out_features), down, self._add_rmsnorm_call(next_norm)]
            self._layers.append(([q, k, v], (_ptr(k_cache), _ptr(v_cache)), after))
            self._matmuls += [q, k, v, o, gate, up, down]
        self._cache = cache

    def _bound_to(self, cache: KVCache | None) -> KVCache:
        cache = self.model.cache if cache is None else cache
        if cache is None:
            raise ValueError("no KV cache: pass one, or call model.setup_cache first")
        if cache is not self._cache:
            self._bind(cache)
        return cache

    def run_matmuls_only(self, cache: KVCache | None = None) -> None:
        """The step's matrix products alone, on the current buffers: a step's time minus
        this is what the decode path spends outside the kernels (for profiling)."""
        self._bound_to(cache)
        self.buf["head_in"][0].copy_(self.buf["h"][0])
        for call in self._matmuls:
            call(1)

    @torch.inference_mode()
    def __call__(self, token: int, pos: int, cache: KVCache | None = None, slot: int = 0) -> torch.Tensor:
        return self.step([token], [pos], cache, [slot])[0]

    @torch.inference_mode()
    def step(self, tokens: list[int], positions: list[int], cache: KVCache | None = None,
             slots: list[int] | None = None, logit_rows: list[int] | None = None) -> torch.Tensor:
        cache = self._bound_to(cache)
        batch = len(tokens)
        slots = list(range(batch)) if slots is None else slots
        self._check(tokens, positions, slots, cache)
        self._embed_rows(tokens)
        self._slots[:batch], self._positions[:batch] = slots, positions
        p, attend, scores = self.ptr, self._attend, _ptr(self._scores)
        cos, sin, stride = _ptr(self._cos), _ptr(self._sin), self._slot_stride
        slot_ptr, pos_ptr = self._slots.ctypes.data, self._positions.ctypes.data
        self._first_norm(batch)
        for before, (k_cache, v_cache), after in self._layers:
            if any(call(batch) for call in before):  # the kernels return nonzero on a rejected call
                raise RuntimeError("the CPU kernels rejected a decode-step matmul")
            attend(p["q"], p["k"], p["v"], cos, sin, k_cache, v_cache, stride, slot_ptr, pos_ptr, batch,
                   self.n_heads, self.n_kv_heads, self.head_dim, self.max_seq, scores, p["attn"])
            if any(call(batch) for call in after):
                raise RuntimeError("the CPU kernels rejected a decode-step matmul")
        wanted = batch if logit_rows is None else len(logit_rows)
        if wanted == 0:  # a prompt chunk that does not end its prompt
            return self.buf["logits"][:0]
        if logit_rows is None:
            self.buf["head_in"][:batch].copy_(self.buf["h"][:batch])
        else:
            torch.index_select(self.buf["h"][:batch], 0, torch.tensor(logit_rows, dtype=torch.long), out=self.buf["head_in"][:wanted])
        if self._head(wanted):
            raise RuntimeError("the CPU kernels rejected the output head's matmul")
        return self.buf["logits"][:wanted]

    def _check(self, tokens: list[int], positions: list[int], slots: list[int], cache: KVCache) -> None:
        if not 1 <= len(tokens) <= self.max_batch or len(positions) != len(tokens) or len(slots) != len(tokens):
            raise ValueError(f"a step takes 1..{self.max_batch} tokens with one position and one slot each, got "
                             f"{len(tokens)} tokens, {len(positions)} positions and {len(slots)} slots")
        for pos in positions:
            if not 0 <= pos < self.max_seq:
                raise ValueError(f"position {pos} does not fit the KV cache of {self.max_seq} positions")
        for token in tokens:
            if not 0 <= token < self.vocab:
                raise ValueError(f"token {token} is outside the vocabulary of {self.vocab}")
        for slot in slots:
            if not 0 <= slot < cache.slots:
                raise ValueError(f"slot {slot} is outside the KV cache's {cache.slots} slots")

    def _embed_rows(self, tokens: list[int]) -> None:
        if self._block_embed is not None:
            self.buf["x"][:len(tokens)].copy_(self._block_embed.lookup(np.array(tokens)))
            return
        row = self.hidden * 4
        for i, token in enumerate(tokens):
            ctypes.memmove(self.ptr["x"].value + i * row, self._embed.data_ptr() + token * row, row)
