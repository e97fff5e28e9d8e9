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
def _rope_attention_kernel(qkv_ptr, inv_freq_ptr, position_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_ptr,
                           arrivals_ptr, cache_len, scale, N_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Program (h, s): query head h against key/value head h // GROUP over the s-th of SPLITS
    equal ranges of the cached positions (flash-decoding: a head's context is read by SPLITS
    programs at once, not walked by one). Every program rotates the group's new key itself (a
    few hundred operations); the last split also takes the new key and value, from registers,
    and the group's first head writes them into the caches for the following steps, so that no
    program waits for another. Cached positions are read a block ahead of the arithmetic.

    With SPLITS > 1 each program leaves its running max, sum and weighted values in `partial`
    and counts itself in `arrivals[h]`; the head's last program to arrive merges the SPLITS
    partial results and resets the count for the next step (so no second launch is needed)."""
    start_dependents(PDL)
    wait_for_inputs(PDL)
    h = tl.program_id(0)
    split = tl.program_id(1)
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
    last_split = split == SPLITS - 1
    if h % GROUP == 0 and last_split:
        tl.store(k_cache_ptr + base + position * HEAD_DIM + d, k_new)
        tl.store(v_cache_ptr + base + position * HEAD_DIM + d, v_new.to(v_cache_ptr.dtype.element_ty))
    # online softmax; the last split starts from the new position, the others from nothing
    best = tl.where(last_split, tl.sum(q * k_new.to(tl.float32), axis=0), float("-inf"))
    total = tl.where(last_split, 1.0, 0.0)
    acc = tl.where(last_split, v_new.to(tl.float32), 0.0)
    per_split = tl.cdiv(position, SPLITS)
    first = split * per_split
    end = tl.minimum(first + per_split, position)
    k, v = _cached_keys_values(k_cache_ptr, v_cache_ptr, base, first, end, HEAD_DIM, BLOCK_L)
    for start in range(first, end, BLOCK_L):
        k_next, v_next = _cached_keys_values(k_cache_ptr, v_cache_ptr, base, start + BLOCK_L, end, HEAD_DIM, BLOCK_L)
        valid = start + tl.arange(0, BLOCK_L) < end
        scores = tl.where(valid, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        correction = tl.exp(best - new_best)
        p = tl.exp(scores - new_best)
        acc = acc * correction + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        total = total * correction + tl.sum(p, axis=0)
        best = new_best
        k, v = k_next, v_next
    if SPLITS == 1:
        tl.store(out_ptr + h * HEAD_DIM + d, (acc / total).to(out_ptr.dtype.element_ty))
    else:
        # partial [H, SPLITS, HEAD_DIM + 2]: the weighted values, then the max and the sum
        row = partial_ptr + (h * SPLITS + split) * (HEAD_DIM + 2)
        tl.store(row + d, acc)
        tl.store(row + HEAD_DIM, best)
        tl.store(row + HEAD_DIM + 1, total)
        # acq_rel: this program's stores are visible to whoever counts after it, and the last
        # one sees every program's
        if tl.atomic_add(arrivals_ptr + h, 1, sem="acq_rel") == SPLITS - 1:
            rows = partial_ptr + (h * SPLITS + tl.arange(0, SPLITS)) * (HEAD_DIM + 2)
            # .cg: from L2, past this SM's L1, which may hold an earlier step's values
            bests = tl.load(rows + HEAD_DIM, cache_modifier=".cg")
            weights = tl.exp(bests - tl.max(bests, axis=0))  # the last split's max is finite
            totals = tl.load(rows + HEAD_DIM + 1, cache_modifier=".cg")
            values = tl.load(rows[:, None] + d[None, :], cache_modifier=".cg")
            merged = tl.sum(weights[:, None] * values, axis=0) / tl.sum(weights * totals, axis=0)
            tl.store(out_ptr + h * HEAD_DIM + d, merged.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(arrivals_ptr + h, 0)


# A decode step's attention is latency-bound: per head, a context of a few hundred to a few
# thousand positions, read block after dependent block. It is cut two ways: SPLITS programs per
# head read a split of the positions each (about two programs per SM, at most
# ATTENTION_MAX_SPLITS), and each reads blocks of BLOCK_L positions, as many as fit
# ATTENTION_TILE cached elements (the block's keys and values and the next block's stay in
# registers). These sizes were the fastest timed on an H200 (docs/gpu.md has the timings).
ATTENTION_TILE = 128 * 128
ATTENTION_WARPS = 4
ATTENTION_MAX_SPLITS = 8
_ATTENTION_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def attention_splits(device: torch.device, n_heads: int) -> int:
    """Programs per head: about two per SM over all heads, rounded down to a power of two (the
    merge reads the splits as one vector); under Triton's interpreter 4, so that the tests take
    the merging path."""
    if device.type != "cuda" or interpreter_enabled():
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return triton.next_power_of_2(max(1, min(ATTENTION_MAX_SPLITS, 2 * sms // n_heads)) + 1) // 2


def rope_attention(qkv: torch.Tensor, inv_freq: torch.Tensor, position: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, out: torch.Tensor, splits: int | None = None) -> None:
    """qkv [(H + 2 KV) * D] of the token at `position` (an int32 tensor of one element, on the
    device): q and k rotated, k and v written into the caches [1, KV, L, D] at the position,
    and out [H, D] = softmax(q k^T / sqrt(D)) v over cache positions 0..position. Each head's
    positions are read by `splits` programs (default attention_splits), whose results the last
    to finish merges. Calls on one device must not overlap (they share a scratch buffer)."""
    _, kv_heads, cache_len, head_dim = k_cache.shape
    n_heads = out.shape[0]
    if head_dim & (head_dim - 1):
        raise ValueError(f"the fused rotary kernel needs a power-of-two head_dim, got {head_dim}")
    splits = splits or attention_splits(out.device, n_heads)
    if splits & (splits - 1):
        raise ValueError(f"splits must be a power of two, got {splits}")
    key = (out.device, n_heads, splits, head_dim)
    if key not in _ATTENTION_SCRATCH:  # the counts start at zero and every call leaves them so
        _ATTENTION_SCRATCH[key] = (torch.empty(n_heads * splits * (head_dim + 2), dtype=torch.float32, device=out.device),
                                   torch.zeros(n_heads, dtype=torch.int32, device=out.device))
    partial, arrivals = _ATTENTION_SCRATCH[key]
    pdl = pdl_supported(out.device)
    _rope_attention_kernel[(n_heads, splits)](qkv, inv_freq, position, k_cache, v_cache, out, partial, arrivals,
                                              cache_len, head_dim**-0.5, N_HEADS=n_heads, N_KV_HEADS=kv_heads,
                                              HEAD_DIM=head_dim, BLOCK_L=min(256, ATTENTION_TILE // head_dim),
                                              SPLITS=splits, PDL=pdl, launch_pdl=pdl, num_warps=ATTENTION_WARPS)


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
