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
by rows (packed weights are stacked in the packed format, so any backend kernel takes them; fp16
weights are concatenated); the decoder keeps these stacked copies, the model keeps its own for
prefill. The small operations are lutlm.kernels.gpu_ops; packed products go straight to the
dispatcher (lutlm.kernels.gpu), whose GEMV also starts loading its weights while the kernel
before it finishes, where the GPU supports it (PDL: the weights are no kernel's output). The
position lives in a device tensor, so the step is captured once as a CUDA graph and replayed
for every token; the graph is captured again if setup_cache replaces the KV cache.

The KV cache is the model's own: prompts are prefilled by `model.forward` and the following
tokens decoded here.
"""

from __future__ import annotations

import torch
from torch import nn

from lutlm.formats.packed import PackedWeight
from lutlm.kernels import interpreter_enabled
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
    """One linear whose outputs are those of `linears` one after another (same input)."""
    if all(isinstance(m, PackedLinear) for m in linears):
        weights = [m.weight_packed for m in linears]
        first = weights[0]
        if all((w.bits, w.group_size, w.ternary) == (first.bits, first.group_size, first.ternary) for w in weights):
            stacked = PackedWeight(planes=torch.cat([w.planes for w in weights], dim=1),
                                   scales=torch.cat([w.scales for w in weights]),
                                   zeros=torch.cat([w.zeros for w in weights]),
                                   bits=first.bits, group_size=first.group_size, ternary=first.ternary)
            return PackedLinear(stacked, linears[0].backend_name)
    if all(isinstance(m, nn.Linear) and m.bias is None for m in linears):
        weight = torch.cat([m.weight.detach() for m in linears])
        stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # weight assigned below
        stacked.weight = nn.Parameter(weight, requires_grad=False)
        return stacked
    return _Concatenated(linears)


class _Concatenated(nn.Module):
    """Linears of different formats that cannot be stacked: run one by one, outputs concatenated."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


class GpuDecoder:
    """`decoder(token, pos)` -> logits [vocab] (fp32) of the token at position `pos`, batch row 0
    of the model's KV cache, which must hold positions 0..pos-1."""

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
                attention=a, input_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm))
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.position = torch.zeros(1, dtype=torch.int32, device=dev)
        self.x = torch.zeros(1, c.hidden_size, dtype=torch.float16, device=dev)
        self.h = torch.zeros_like(self.x)
        self.attn = torch.zeros(c.num_attention_heads, c.head_dim, dtype=torch.float16, device=dev)
        self.act = torch.zeros(1, c.intermediate_size, dtype=torch.float16, device=dev)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self._cache_owner: torch.Tensor | None = None  # the k_cache the graph was captured on

    def product(self, linear: nn.Module, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """linear(x) in the step; gated: x is [gate | up] and the product is of SiLU(gate) * up."""
        if isinstance(linear, PackedLinear):  # the cuda backend's (unsupported_reason)
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
        for layer in self.layers:
            norm, a = layer["input_norm"], layer["attention"]
            ops.add_rms_norm(self.x, delta, norm.weight, norm.eps, self.h)
            qkv = self.product(layer["qkv"], self.h)
            ops.rope_attention(qkv.view(-1), m.inv_freq, self.position, a.k_cache, a.v_cache, self.attn)
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
        self._cache_owner = self.model.model.layers[0].self_attn.k_cache

    @torch.inference_mode()
    def __call__(self, token: int, pos: int) -> torch.Tensor:
        k_cache = self.model.model.layers[0].self_attn.k_cache
        if k_cache is None:
            raise ValueError("the model has no KV cache; call model.setup_cache first")
        if not 0 <= pos < k_cache.shape[2]:
            raise ValueError(f"position {pos} does not fit the KV cache of {k_cache.shape[2]} positions")
        if not 0 <= token < self.vocab:
            raise ValueError(f"token {token} is outside the vocabulary of {self.vocab}")
        self.token.fill_(token)
        self.position.fill_(pos)
        if not self.use_graph:  # Triton's interpreter on the CPU (the tests): eager steps
            return self.step()[0].float()
        if self.graph is None or k_cache is not self._cache_owner:
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
