"""A Llama-family decoder in plain PyTorch.

Module names follow Hugging Face's LlamaForCausalLM, so a Hugging Face state dict loads
as it is and every projection is an ``nn.Linear`` that ``lutlm.linear.replace_linears``
can swap for a low-bit one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lutlm.config import ModelConfig
from lutlm.kv_cache import KVCache


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: Rows,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if rows.slots is None:  # rows 0..B-1 of the cache at one position: one attention call
            out = attend(q, k, v, k_cache[:batch], v_cache[:batch], rows.starts[0])
        else:  # each sequence over its own slot, as it would run alone
            out = torch.cat([attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], k_cache[s:s + 1], v_cache[s:s + 1], start)
                             for b, (s, start) in enumerate(zip(rows.slots, rows.starts))])
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           start_pos: int) -> torch.Tensor:
    """Store k and v at start_pos.. of the caches (rows matching q's), then attend over them."""
    seq = q.shape[2]
    end = start_pos + seq
    k_cache[:, :, start_pos:end] = k
    v_cache[:, :, start_pos:end] = v
    keys = k_cache[:, :, :end].to(q.dtype)  # a copy only where the cache is narrower
    values = v_cache[:, :, :end].to(q.dtype)
    if seq == 1:
        mask, causal = None, False  # one new token attends to everything cached
    elif start_pos == 0:
        mask, causal = None, True  # SDPA's own causal mask skips the masked blocks
    else:
        # Query i sits at position start_pos + i and sees keys up to that position.
        rows = torch.arange(start_pos, end, device=q.device).unsqueeze(1)
        mask, causal = torch.arange(end, device=q.device).unsqueeze(0) <= rows, False
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: Rows, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rows, k_cache, v_cache)
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


@dataclass
class Rows:
    """Where a forward pass's rows go: row b at positions starts[b].. of cache slot slots[b];
    slots None: row b in slot b, all at one position (a batch of one length)."""

    starts: list[int]
    slots: list[int] | None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.cache: KVCache | None = None  # setup_cache's, for callers that pass none

    def setup_cache(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None,
                    fresh: bool = False) -> KVCache:
        """The default KV cache, used by forward calls that pass none (scoring, calibration; a
        generator or server owns its caches). `dtype`: the cache's (default the model's float
        type). A cache that fits is kept unless `fresh`: then a new one of exactly this size
        replaces it (a smaller cache frees memory; training needs buffers that no earlier
        autograd graph holds)."""
        dtype = dtype or self.model.norm.weight.dtype
        if self.cache is None or fresh or not self.cache.fits(max_batch, max_seq_len, dtype):
            self.cache = None  # the old buffers go before the new ones come
            self.cache = KVCache(self.config, max_batch, max_seq_len, dtype, self.model.norm.weight.device)
        return self.cache

    def forward(self, tokens: torch.Tensor, start_pos: int | list[int] = 0, last_logits_only: bool = False,
                cache: KVCache | None = None, slots: list[int] | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (or [B, 1, vocab]). Row b sits at positions
        start_pos .. start_pos+T-1 (or start_pos[b]..: one start per row) of `cache` (default
        setup_cache's), in slot slots[b] (default b)."""
        batch, seq = tokens.shape
        cache = self.cache if cache is None else cache
        if cache is None:
            raise ValueError("no KV cache: pass one, or call setup_cache first")
        starts = [start_pos] * batch if isinstance(start_pos, int) else [int(p) for p in start_pos]
        rows = Rows(starts, None if slots is None and isinstance(start_pos, int) else
                    list(range(batch)) if slots is None else [int(s) for s in slots])
        if len(starts) != batch or (rows.slots is not None and len(rows.slots) != batch) or min(starts) < 0:
            raise ValueError(f"{batch} rows need one start position and one slot each, got {start_pos} and {slots}")
        cache.check(rows.slots or range(batch), max(starts) + seq)
        dtype = self.model.norm.weight.dtype
        if rows.slots is None:
            cos, sin = rope_tables(self.inv_freq, starts[0], seq, dtype)
        else:  # [B, 1, T, head_dim]: each row's own positions, for all heads
            tables = [rope_tables(self.inv_freq, start, seq, dtype) for start in starts]
            cos, sin = (torch.stack([t[i] for t in tables]).unsqueeze(1) for i in (0, 1))

        x = self.model.embed_tokens(tokens)
        for layer, k_cache, v_cache in zip(self.model.layers, cache.keys, cache.values):
            x = layer(x, cos, sin, rows, k_cache, v_cache)
        x = self.model.norm(x)
        if last_logits_only:
            x = x[:, -1:]
        return self.lm_head(x).float()
