"""The small operations of a GPU decode step, fused into one Triton launch each.

`Transformer.forward` spends about thirty PyTorch operations per layer around its seven
products (an RMSNorm alone is eight kernels); inside a CUDA graph each still costs a launch
of one to two microseconds, which on a 7B model adds up to more than the 4-bit products
themselves. lutlm.gpu_decode runs a step on these instead:

* ``add_rms_norm``: the residual add and the RMSNorm after it;
* ``rope_and_cache``: rotary embedding of q and k for one token, k and v written into the KV
  cache at a position read from device memory (so one captured graph serves every position);
* ``decode_attention``: one query token against the cached keys and values up to that position
  (grouped-query heads, online softmax in fp32);
* ``silu_mul``: SiLU(gate) * up from the fused gate/up projection.

Each matches the PyTorch operations it replaces up to fp16 rounding (they compute in fp32 and
round once where PyTorch rounds after each operation); tests/test_gpu_ops.py checks them
against model.py's code under Triton's interpreter. Shapes are those of one decode token:
activation rows of the model's width, caches [batch, kv_heads, length, head_dim] of batch 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, out_ptr, D, eps, ADD: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    x = tl.load(x_ptr + row * D + d, mask=mask, other=0.0)
    if ADD:  # x += delta, rounded to x's dtype as PyTorch's add would, and kept for the next residual
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * D + d, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(x_ptr + row * D + d, x, mask=mask)
    x = x.to(tl.float32)
    rms = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + d, (w * x * rms).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out: torch.Tensor) -> None:
    """x += delta (when given, in place), then out = RMSNorm(x) * weight. x, delta, out: [M, D]."""
    m, d = x.shape
    block = triton.next_power_of_2(d)
    # One program a row: enough warps that a 4096-wide row is 8 values a thread, not 32.
    _add_rms_norm_kernel[(m,)](x, x if delta is None else delta, weight, out, d, eps, ADD=delta is not None,
                               BLOCK_D=block, num_warps=max(1, min(16, block // 256)))


@triton.jit
def _rope_and_cache_kernel(qkv_ptr, inv_freq_ptr, position_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, cache_len,
                           N_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Program h < N_HEADS rotates query head h into q_out; program N_HEADS + j rotates key head j
    and copies value head j into the caches at the position. qkv: [q heads | k heads | v heads]."""
    h = tl.program_id(0)
    HALF: tl.constexpr = HEAD_DIM // 2
    position = tl.load(position_ptr)
    i = tl.arange(0, HALF)
    angle = position.to(tl.float32) * tl.load(inv_freq_ptr + i)
    cos, sin = tl.cos(angle), tl.sin(angle)
    x1 = tl.load(qkv_ptr + h * HEAD_DIM + i).to(tl.float32)
    x2 = tl.load(qkv_ptr + h * HEAD_DIM + HALF + i).to(tl.float32)
    r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin  # rotate_half layout: pairs (i, i + HALF)
    if h < N_HEADS:
        tl.store(q_out_ptr + h * HEAD_DIM + i, r1.to(q_out_ptr.dtype.element_ty))
        tl.store(q_out_ptr + h * HEAD_DIM + HALF + i, r2.to(q_out_ptr.dtype.element_ty))
    else:
        j = h - N_HEADS
        slot = (j * cache_len + position) * HEAD_DIM
        tl.store(k_cache_ptr + slot + i, r1.to(k_cache_ptr.dtype.element_ty))
        tl.store(k_cache_ptr + slot + HALF + i, r2.to(k_cache_ptr.dtype.element_ty))
        d = tl.arange(0, HEAD_DIM)
        v = tl.load(qkv_ptr + (N_HEADS + N_KV_HEADS + j) * HEAD_DIM + d)
        tl.store(v_cache_ptr + slot + d, v)


def rope_and_cache(qkv: torch.Tensor, inv_freq: torch.Tensor, position: torch.Tensor, q_out: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """qkv [(H + 2 KV) * D] of one token -> q_out [H, D] rotated; k (rotated) and v into the
    caches [1, KV, L, D] at `position` (an int32 tensor of one element, on the device)."""
    _, kv_heads, cache_len, head_dim = k_cache.shape
    n_heads = q_out.shape[0]
    if head_dim & (head_dim - 1):
        raise ValueError(f"the fused rotary kernel needs a power-of-two head_dim, got {head_dim}")
    _rope_and_cache_kernel[(n_heads + kv_heads,)](qkv, inv_freq, position, q_out, k_cache, v_cache, cache_len,
                                                  N_HEADS=n_heads, N_KV_HEADS=kv_heads, HEAD_DIM=head_dim)


@triton.jit
def _decode_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, position_ptr, out_ptr, cache_len, scale,
                             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr):
    """Query head h against the cached positions 0..position of its key/value head h // GROUP."""
    h = tl.program_id(0)
    kv = h // GROUP
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + h * HEAD_DIM + d).to(tl.float32) * scale
    position = tl.load(position_ptr)
    base = kv * cache_len * HEAD_DIM
    best = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((HEAD_DIM,), tl.float32)
    for start in range(0, position + 1, BLOCK_L):
        slots = start + tl.arange(0, BLOCK_L)
        valid = slots <= position
        offsets = base + slots[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        correction = tl.exp(best - new_best)
        p = tl.exp(scores - new_best)
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
        total = total * correction + tl.sum(p, axis=0)
        best = new_best
    tl.store(out_ptr + h * HEAD_DIM + d, (acc / total).to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor,
                     out: torch.Tensor) -> None:
    """q [H, D] of the token at `position` (device int32 tensor) -> out [H, D]: softmax(q k^T / sqrt(D)) v
    over cache positions 0..position. One program per head walks the positions in blocks, which
    suits the short and medium contexts of interactive decoding."""
    n_heads, head_dim = q.shape
    _, kv_heads, cache_len, _ = k_cache.shape
    _decode_attention_kernel[(n_heads,)](q, k_cache, v_cache, position, out, cache_len, head_dim**-0.5,
                                         GROUP=n_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_L=64)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, WIDTH, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < WIDTH
    g = tl.load(gate_up_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + WIDTH + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    """gate_up [2 I] (gate, then up) of one token -> out [I] = SiLU(gate) * up."""
    width = out.numel()
    _silu_mul_kernel[(triton.cdiv(width, 1024),)](gate_up, out, width, BLOCK=1024)
