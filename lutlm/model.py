"""A Llama-family decoder in plain PyTorch.

Module names follow Hugging Face's LlamaForCausalLM, so a Hugging Face state dict loads
as it is and every projection is an ``nn.Linear`` that ``lutlm.linear.replace_linears``
can swap for a low-bit one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lutlm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Rotary frequencies with the model's theta and, where configured, its scaling rule."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        # Llama 3.1: long wavelengths scaled down by `factor`, short ones kept, smooth between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(mid, blended, scaled).float()
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def rope_tables(inv_freq: torch.Tensor, start_pos: int, seq: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [seq, head_dim] for positions start_pos .. start_pos+seq-1, in rotate_half's layout."""
    positions = torch.arange(start_pos, start_pos + seq, device=inv_freq.device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        end = start_pos + seq
        self.k_cache[:batch, :, start_pos:end] = k
        self.v_cache[:batch, :, start_pos:end] = v
        keys = self.k_cache[:batch, :, :end].to(q.dtype)  # a copy only where the cache is narrower
        values = self.v_cache[:batch, :, :end].to(q.dtype)

        if seq == 1:
            mask, causal = None, False  # one new token attends to everything cached
        elif start_pos == 0:
            mask, causal = None, True  # SDPA's own causal mask skips the masked blocks (1.6x at 1536 tokens)
        else:
            # Query i sits at position start_pos + i and sees keys up to that position.
            rows = torch.arange(start_pos, end, device=x.device).unsqueeze(1)
            mask, causal = torch.arange(end, device=x.device).unsqueeze(0) <= rows, False
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def model_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: that of its rotary table (on the CPU for models without one)."""
    return getattr(getattr(model, "inv_freq", None), "device", torch.device("cpu"))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.max_batch = 0
        self.max_seq_len = 0
        self.cache_allocations = 0  # counts setup_cache's new caches: what a cache held is gone

    def setup_cache(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None,
                    fresh: bool = False) -> None:
        """Preallocate the KV cache; generation never allocates per token. `dtype`: the cache's
        (default the model's float type); generation keeps it in float16, as llama.cpp does,
        which halves what a decode step reads at long contexts. A cache that fits is kept unless
        `fresh`: then new buffers of exactly this size replace it (a smaller cache frees memory;
        training needs buffers that no earlier autograd graph holds)."""
        if max_seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"context {max_seq_len} exceeds the model's {self.config.max_position_embeddings} positions"
            )
        dtype = dtype or self.model.norm.weight.dtype
        cache = self.model.layers[0].self_attn.k_cache
        fits = cache is not None and max_batch <= self.max_batch and max_seq_len <= self.max_seq_len
        if fits and cache.dtype == dtype and not fresh:
            return
        c = self.config
        device = self.model.norm.weight.device
        for layer in self.model.layers:
            shape = (max_batch, c.num_key_value_heads, max_seq_len, c.head_dim)
            layer.self_attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.cache_allocations += 1

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, last_logits_only: bool = False) -> torch.Tensor:
        """tokens [B, T] at positions start_pos .. start_pos+T-1 -> logits [B, T, vocab] (or [B, 1, vocab])."""
        batch, seq = tokens.shape
        if batch > self.max_batch or start_pos + seq > self.max_seq_len:
            raise ValueError(
                f"batch {batch} at positions {start_pos}..{start_pos + seq} does not fit the KV cache "
                f"({self.max_batch} x {self.max_seq_len}); call setup_cache first"
            )
        cos, sin = rope_tables(self.inv_freq, start_pos, seq, self.model.norm.weight.dtype)

        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, start_pos)
        x = self.model.norm(x)
        if last_logits_only:
            x = x[:, -1:]
        return self.lm_head(x).float()
