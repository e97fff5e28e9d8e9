"""One-token decode steps on the GPU, replayed from a CUDA graph.

The GPU counterpart of lutlm.fast_decode. A decode step of `Transformer.forward` launches about
sixty kernels per layer (eight for an RMSNorm, ten for the rotary embedding, four per packed
product); even inside a CUDA graph each costs one to two microseconds, more than the 4-bit
products of a 7B model take. `GpuDecoder` computes the same step with eight launches a layer
(seven where the weights are packed and their batch-1 kernel is the dp4a GEMV, which takes the
gate/up output as it is and computes SiLU(gate) * up as it loads it):

    add_rms_norm -> qkv product -> rope_attention -> o product
    -> add_rms_norm -> gate/up product -> [silu_mul ->] down product

The q, k and v projections, and gate and up, run as one product each over their weights stacked
by rows (packed weights in the GPU layouts, fp16 weights as one matrix); the model's own linears,
which prefill uses, are then re-pointed at views of the stacked weights, so stacking costs no
memory (it did: 1.7x the weights of a 7B model). The small operations are lutlm.kernels.gpu_ops;
packed products go straight to the dispatcher (lutlm.kernels.gpu), whose GEMV also starts loading
its weights while the kernel before it finishes, where the GPU supports it (PDL: the weights are
no kernel's output). The position lives in a device tensor, so the step is captured once as a
CUDA graph and replayed for every token; the graph is captured again for another KV cache.

The KV cache is the caller's (lutlm.kv_cache; slot 0): prompts are prefilled by `model.forward`
into it and the following tokens decoded here.
"""

from __future__ import annotations

import torch
from torch import nn

from lutlm.kernels import interpreter_enabled
from lutlm.kv_cache import KVCache
from lutlm.linear import PackedLinear
from lutlm.model import Transformer


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` cannot use the GPU decode path, or None if it can."""
    if not isinstance(model, Transformer):
        return f"a {type(model).__name__} is not a lutlm Transformer"
    device = model.model.norm.weight.device.type
    if device != "cuda" and not (device == "cpu" and interpreter_enabled()):
        return "the model is not on a CUDA device"
    if model.model.norm.weight.dtype != torch.float16:
        return "the model's float tensors are not fp16"
    for name, linear in model.named_modules():
        if isinstance(linear, PackedLinear) and linear.backend_name != "cuda":
            return f"{name} is packed for the {linear.backend_name} backend"
    return None


def gpu_decoder_for(model: nn.Module) -> GpuDecoder | None:
    """A GpuDecoder for `model` where it can run, else None (decode through model.forward)."""
    return GpuDecoder(model) if unsupported_reason(model) is None else None


def stack_rows(linears: list[nn.Module]) -> nn.Module:
    """One linear whose outputs are those of `linears` one after another (same input). Packed
    linears of the cuda backend and fp16 linears are stacked, and then read their weights from
    views of the stacked ones (theirs are freed); others run one by one."""
    if all(isinstance(m, PackedLinear) and m.backend_name == "cuda" for m in linears):
        from lutlm.kernels import gpu

        handles = [m.handle for m in linears]
        if all(h.kind == handles[0].kind for h in handles):
            stacked = gpu.stack(handles)
            for m, start in zip(linears, _row_starts(linears)):
                m.share_handle(stacked.rows(start, start + m.out_features))
            return _StackedPacked(stacked)
    weights = [m.weight for m in linears if isinstance(m, nn.Linear) and m.bias is None]
    if len(weights) == len(linears) and len({(w.dtype, w.device) for w in weights}) == 1:
        weight = torch.cat([w.detach() for w in weights])
        for m, start in zip(linears, _row_starts(linears)):
            m.weight = nn.Parameter(weight[start:start + m.out_features], requires_grad=False)
        stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # weight assigned below
        stacked.weight = nn.Parameter(weight, requires_grad=False)
        return stacked
    return _Concatenated(linears)


def _row_starts(linears: list[nn.Module]) -> list[int]:
    starts, row = [], 0
    for m in linears:
        starts.append(row)
        row += m.out_features
    return starts


class _StackedPacked(nn.Module):
    """Packed weights stacked by rows in the cuda backend's layouts."""

    def __init__(self, handle):
        super().__init__()
        self.handle = handle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lutlm.kernels import gpu

        return gpu.matmul(x, self.handle)


class _Concatenated(nn.Module):
    """Linears of different formats that cannot be stacked: run one by one, outputs concatenated."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


class GpuDecoder:
    """`decoder(token, pos, cache)` -> logits [vocab] (fp32) of the token at position `pos` of
    slot 0 of `cache` (default: the model's setup_cache one), which must hold positions 0..pos-1."""

    def __init__(self, model: Transformer):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the GPU decode path cannot run this model: {reason}")
        from lutlm.kernels import gpu, gpu_ops

        self.ops = gpu_ops
        self.gpu = gpu
        self.model = model
        c = model.config
        self.vocab = c.vocab_size
        dev = model.model.norm.weight.device
        self.use_graph = dev.type == "cuda"
        self.layers = []
        for layer in model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                qkv=stack_rows([a.q_proj, a.k_proj, a.v_proj]), o=a.o_proj,
                gate_up=stack_rows([mlp.gate_proj, mlp.up_proj]), down=mlp.down_proj,
                input_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm))
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.position = torch.zeros(1, dtype=torch.int32, device=dev)
        self.x = torch.zeros(1, c.hidden_size, dtype=torch.float16, device=dev)
        self.h = torch.zeros_like(self.x)
        self.attn = torch.zeros(c.num_attention_heads, c.head_dim, dtype=torch.float16, device=dev)
        self.act = torch.zeros(1, c.intermediate_size, dtype=torch.float16, device=dev)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.cache: KVCache | None = None  # the cache the step runs on (and the graph was captured on)

    def product(self, linear: nn.Module, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """linear(x) in the step; gated: x is [gate | up] and the product is of SiLU(gate) * up."""
        if isinstance(linear, (PackedLinear, _StackedPacked)):  # the cuda backend's (unsupported_reason)
            return self.gpu.matmul(x, linear.handle, gated=gated, overlap=True)
        if gated:
            self.ops.silu_mul(x.view(-1), self.act.view(-1))
            x = self.act
        return linear(x)

    def step(self) -> torch.Tensor:
        """The decode step on the device buffers (token, position): what the graph captures."""
        m, ops = self.model, self.ops
        torch.index_select(m.model.embed_tokens.weight, 0, self.token, out=self.x)
        delta = None
        for layer, k_cache, v_cache in zip(self.layers, self.cache.keys, self.cache.values):
            norm = layer["input_norm"]
            ops.add_rms_norm(self.x, delta, norm.weight, norm.eps, self.h)
            qkv = self.product(layer["qkv"], self.h)
            ops.rope_attention(qkv.view(-1), m.inv_freq, self.position, k_cache[:1], v_cache[:1], self.attn)
            delta = self.product(layer["o"], self.attn.view(1, -1))
            norm = layer["post_norm"]
            ops.add_rms_norm(self.x, delta, norm.weight, norm.eps, self.h)
            delta = self.product(layer["down"], self.product(layer["gate_up"], self.h), gated=True)
        norm = m.model.norm
        ops.add_rms_norm(self.x, delta, norm.weight, norm.eps, self.h)
        return m.lm_head(self.h)

    def _capture(self) -> None:
        """Compile every kernel with one eager step, then record the step as a graph."""
        self.step()
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step()

    @torch.inference_mode()
    def __call__(self, token: int, pos: int, cache: KVCache | None = None) -> torch.Tensor:
        cache = self.model.cache if cache is None else cache
        if cache is None:
            raise ValueError("no KV cache: pass one, or call model.setup_cache first")
        if not 0 <= pos < cache.max_seq:
            raise ValueError(f"position {pos} does not fit the KV cache of {cache.max_seq} positions")
        if not 0 <= token < self.vocab:
            raise ValueError(f"token {token} is outside the vocabulary of {self.vocab}")
        self.token.fill_(token)
        self.position.fill_(pos)
        recapture = cache is not self.cache
        self.cache = cache
        if not self.use_graph:  # Triton's interpreter on the CPU (the tests): eager steps
            return self.step()[0].float()
        if self.graph is None or recapture:
            self._capture()  # its eager step wrote this position's k and v; the replay rewrites the same
        self.graph.replay()
        return self.logits[0].float()

    def products_only(self) -> None:
        """The step's matrix products alone (with the SiLU gate, which the packed GEMV fuses), on
        the current buffers: a step's time minus this is what the decode path spends outside the
        products (for profiling)."""
        for layer in self.layers:
            self.product(layer["qkv"], self.h)
            self.product(layer["o"], self.attn.view(1, -1))
            self.product(layer["down"], self.product(layer["gate_up"], self.h), gated=True)
        self.model.lm_head(self.h)
