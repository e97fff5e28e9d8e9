"""The small operations of a GPU decode step, fused into one Triton launch each.

`Transformer.forward` spends about thirty PyTorch operations per layer around its seven
products (an RMSNorm alone is eight kernels); inside a CUDA graph each still costs a launch
of one to two microseconds, which on a 7B model adds up to more than the 4-bit products
themselves. lutlm.gpu_decode runs a step on these instead:

* ``add_rms_norm``: the residual add and the RMSNorm after it;
* ``rope_attention``: rotary embedding of q and k for one token, k and v written into the KV
  cache at a position read from device memory (so one captured graph serves every position),
  and the query against the cached keys and values up to that position (grouped-query heads,
  online softmax in fp32);
* ``silu_mul``: SiLU(gate) * up from the fused gate/up projection (for products that cannot
  take the gate/up output themselves, see gpu_dequant's gated GEMV).

Where the GPU supports it (Hopper and later), each launches with programmatic dependent launch
(PDL): the next kernel of the stream is started while this one runs, and waits for it with
``wait_for_inputs`` before touching its outputs; what it may do before the wait (the GEMV loads
its first weights) overlaps this kernel's tail and the launch gap. Every kernel launched so must
wait before it reads anything an earlier kernel wrote and before it writes anything.

Each matches the PyTorch operations it replaces up to fp16 rounding (they compute in fp32 and
round once where PyTorch rounds after each operation); tests/test_gpu_decode.py checks them
against model.py's code under Triton's interpreter. Shapes are those of one decode token:
activation rows of the model's width, caches [batch, kv_heads, length, head_dim] of batch 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lutlm.kernels import interpreter_enabled


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on `device` can launch with PDL: NVIDIA compute capability 9 and above,
    and a Triton that has its grid dependency operations (3.4 on)."""
    return (device.type == "cuda" and not interpreter_enabled() and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait"))


@triton.jit
def start_dependents(PDL: tl.constexpr):
    """Let the next kernel of the stream launch now (it waits for this one in wait_for_inputs)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Wait until the previous kernel of the stream has finished and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, out_ptr, D, eps, ADD: tl.constexpr, BLOCK_D: tl.constexpr,
                         PDL: tl.constexpr):
    start_dependents(PDL)
    wait_for_inputs(PDL)
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
    pdl = pdl_supported(x.device)
    # One program a row: enough warps that a 4096-wide row is 8 values a thread, not 32.
    _add_rms_norm_kernel[(m,)](x, x if delta is None else delta, weight, out, d, eps, ADD=delta is not None,
                               BLOCK_D=block, PDL=pdl, num_warps=max(1, min(16, block // 256)), launch_pdl=pdl)


@triton.jit
def _rotated(qkv_ptr, head, cos, sin, HEAD_DIM: tl.constexpr):
    """Head `head` of qkv rotated, fp32 [HEAD_DIM]: x cos + rotate_half(x) sin, where
    rotate_half pairs d with d + HEAD_DIM / 2 (the first half taking the partner negated)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    x = tl.load(qkv_ptr + head * HEAD_DIM + d).to(tl.float32)
    partner = tl.load(qkv_ptr + head * HEAD_DIM + (d + HALF) % HEAD_DIM).to(tl.float32)
    return x * cos + tl.where(d < HALF, -partner, partner) * sin


@triton.jit
def _cached_keys_values(k_cache_ptr, v_cache_ptr, base, start, end, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr):
    """Cached keys and values of positions start .. start + BLOCK_L (zero from `end` on), fp16
    [BLOCK_L, HEAD_DIM] each."""
    slots = start + tl.arange(0, BLOCK_L)
    offsets = base + slots[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    valid = (slots < end)[:, None]
    return (tl.load(k_cache_ptr + offsets, mask=valid, other=0.0),
            tl.load(v_cache_ptr + offsets, mask=valid, other=0.0))


@triton.jit
def _rope_attention_kernel(qkv_ptr, inv_freq_ptr, position_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cache_len, scale,
                           N_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_L: tl.constexpr, PDL: tl.constexpr):
    """Program h: query head h against key/value head h // GROUP. Every program of a group
    rotates the group's new key itself (a few hundred operations) and takes the new key and
    value from registers, so that no program waits for another; the group's first program
    writes them into the caches for the following steps. Cached positions are read a block
    ahead of the arithmetic, so that a load is always in flight."""
    start_dependents(PDL)
    wait_for_inputs(PDL)
    h = tl.program_id(0)
    GROUP: tl.constexpr = N_HEADS // N_KV_HEADS
    kv = h // GROUP
    position = tl.load(position_ptr)
    d = tl.arange(0, HEAD_DIM)
    angle = position.to(tl.float32) * tl.load(inv_freq_ptr + d % (HEAD_DIM // 2))
    cos, sin = tl.cos(angle), tl.sin(angle)
    q = _rotated(qkv_ptr, h, cos, sin, HEAD_DIM) * scale
    # k and v as the cache holds them (fp16), so that this step sees what later steps will
    k_new = _rotated(qkv_ptr, N_HEADS + kv, cos, sin, HEAD_DIM).to(k_cache_ptr.dtype.element_ty)
    v_new = tl.load(qkv_ptr + (N_HEADS + N_KV_HEADS + kv) * HEAD_DIM + d)
    base = kv * cache_len * HEAD_DIM
    if h % GROUP == 0:
        tl.store(k_cache_ptr + base + position * HEAD_DIM + d, k_new)
        tl.store(v_cache_ptr + base + position * HEAD_DIM + d, v_new.to(v_cache_ptr.dtype.element_ty))
    # online softmax, starting from the new position
    best = tl.sum(q * k_new.to(tl.float32), axis=0)
    total = tl.full((), 1.0, tl.float32)
    acc = v_new.to(tl.float32)
    k, v = _cached_keys_values(k_cache_ptr, v_cache_ptr, base, 0, position, HEAD_DIM, BLOCK_L)
    for start in range(0, position, BLOCK_L):
        k_next, v_next = _cached_keys_values(k_cache_ptr, v_cache_ptr, base, start + BLOCK_L, position, HEAD_DIM,
                                             BLOCK_L)
        valid = start + tl.arange(0, BLOCK_L) < position
        scores = tl.where(valid, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        correction = tl.exp(best - new_best)
        p = tl.exp(scores - new_best)
        acc = acc * correction + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        total = total * correction + tl.sum(p, axis=0)
        best = new_best
        k, v = k_next, v_next
    tl.store(out_ptr + h * HEAD_DIM + d, (acc / total).to(out_ptr.dtype.element_ty))


def rope_attention(qkv: torch.Tensor, inv_freq: torch.Tensor, position: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, out: torch.Tensor) -> None:
    """qkv [(H + 2 KV) * D] of the token at `position` (an int32 tensor of one element, on the
    device): q and k rotated, k and v written into the caches [1, KV, L, D] at the position,
    and out [H, D] = softmax(q k^T / sqrt(D)) v over cache positions 0..position. One program
    per head walks the positions in blocks, which suits the short and medium contexts of
    interactive decoding."""
    _, kv_heads, cache_len, head_dim = k_cache.shape
    n_heads = out.shape[0]
    if head_dim & (head_dim - 1):
        raise ValueError(f"the fused rotary kernel needs a power-of-two head_dim, got {head_dim}")
    pdl = pdl_supported(out.device)
    _rope_attention_kernel[(n_heads,)](qkv, inv_freq, position, k_cache, v_cache, out, cache_len, head_dim**-0.5,
                                       N_HEADS=n_heads, N_KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_L=32,
                                       PDL=pdl, launch_pdl=pdl)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, WIDTH, BLOCK: tl.constexpr, PDL: tl.constexpr):
    start_dependents(PDL)
    wait_for_inputs(PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < WIDTH
    g = tl.load(gate_up_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + WIDTH + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    """gate_up [2 I] (gate, then up) of one token -> out [I] = SiLU(gate) * up."""
    width = out.numel()
    pdl = pdl_supported(out.device)
    _silu_mul_kernel[(triton.cdiv(width, 1024),)](gate_up, out, width, BLOCK=1024, PDL=pdl, launch_pdl=pdl)
