"""Dequantize-in-registers mpGEMM on the GPU (Triton).

Each program reads the packed codes of a tile of weight rows, turns them into floats in
registers and multiplies at once, so that only the packed bytes cross the memory bus. For a
batch of 16 or more the products run on the tensor cores (``tl.dot``); for single tokens a
CUDA-core path (multiply-add, one reduction at the end) is also offered, and the dispatcher in
``lutlm.kernels.gpu`` picks whichever its tuning table measured faster.

GPU layout, built once from the canonical bit-planes (lutlm/formats/packed.py) by ``pack``:

    A b-bit code q is stored as word streams of widths STREAMS[b], low bits first
    (b = 3: q = q0 + 4 * q1, a 2-bit and a 1-bit stream, so 3 bits cost 3 bits). Every stream
    has P = 32 // STREAMS[b][0] codes a word, so stream j's words are P * w_j bits wide:
    int32 for the first stream, int16 for the 1-bit stream of b = 3.
    words_j : [N, Kp // P]       Kp = K rounded up to a multiple of 16 * P (zero codes past K)
        Within each block of 16 words (16 * P weights of a row), word c holds the codes of
        weights  k = block * 16 * P + i * 16 + c,  i = 0 .. P - 1,  at bits [i * w_j, (i+1) * w_j).
        So the i-th code of 16 adjacent words covers 16 adjacent activations: unpacking
        needs one constant shift per i and no reshuffle, and x is read in runs of 16.
    scales  : float16 [Kp // g, N]    transposed, so that a block of rows reads them in one run
    zeros   : float16 [Kp // g, N]    in code units, as in the canonical format; zero past K
    w[n, k] = scales[k // g, n] * (q[n, k] - zeros[k // g, n])

g, the kernel's group, is the largest power of two <= 128 dividing the format's group size G
(Triton tiles are powers of two); where g < G each scale and zero is repeated G // g times.
A word's P codes may span several groups (16 * P > g), so scales are read per code row i.

Codes become floats without an integer-to-float instruction (a quarter of the integer rate on
Hopper): OR-ing q into the mantissa of 1024.0 (fp16 0x6400) gives 1024 + q exactly, and
OR-ing q << (23 - b) into 1.0 (fp32 0x3F800000) gives 1 + q / 2^b exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

STREAMS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}
BLOCK_WORDS = 16  # words per interleaving block
MAX_KERNEL_GROUP = 128


@dataclass
class DequantLayout:
    words: tuple[torch.Tensor, ...]  # one [N, Kp // P] per stream
    bits: int
    scales: torch.Tensor  # float16 [Kp // group, N]
    zeros: torch.Tensor  # float16 [Kp // group, N]
    group: int
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.words, self.scales, self.zeros))


def kernel_group(group_size: int) -> int:
    """The power-of-two group the kernels iterate over; the format's groups are multiples of it."""
    if group_size % 32:
        raise ValueError(f"the cuda backend needs a group size that is a multiple of 32, got {group_size}")
    g = MAX_KERNEL_GROUP
    while group_size % g:
        g //= 2
    return g


def pack(codes: torch.Tensor, bits: int, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> DequantLayout:
    """Codes uint8 [N, K] and the format's scales/zeros [N, K // G] -> the GPU layout above."""
    n, k = codes.shape
    widths = STREAMS[bits]
    per_word = 32 // widths[0]
    block = BLOCK_WORDS * per_word
    padded = -(-k // block) * block
    g = kernel_group(group_size)
    codes = torch.nn.functional.pad(codes.to(torch.int32), (0, padded - k))
    # [N, blocks, i, c] -> [N, blocks, c, i]: code i of word c is weight block * 16P + i * 16 + c.
    codes = codes.view(n, padded // block, per_word, BLOCK_WORDS).transpose(2, 3)
    positions = torch.arange(per_word, device=codes.device, dtype=torch.int32)
    words, shift = [], 0
    for width in widths:
        part = ((codes >> shift) & ((1 << width) - 1)).to(torch.int64)
        packed = (part << (positions * width)).sum(-1).reshape(n, padded // per_word)  # disjoint fields: sum is OR
        nbits = per_word * width
        signed = torch.where(packed >= 2 ** (nbits - 1), packed - 2**nbits, packed)
        words.append(signed.to(torch.int32 if nbits == 32 else torch.int16).contiguous())
        shift += width
    pad_groups = (padded - k) // g

    def per_kernel_group(t: torch.Tensor) -> torch.Tensor:
        t = t.repeat_interleave(group_size // g, dim=1)
        return torch.nn.functional.pad(t, (0, pad_groups)).t().contiguous()

    return DequantLayout(words=tuple(words), bits=bits, scales=per_kernel_group(scales),
                         zeros=per_kernel_group(zeros), group=g, out_features=n, in_features=k)


@triton.jit
def _load_words(ptr, offsets, step, rows_mask, block, end, BLOCK_B: tl.constexpr):
    """One K step's words [rows, blocks, 16] as int32; blocks at or past `end` read as zero."""
    mask = rows_mask[:, None, None] & (step * BLOCK_B + block < end)[None, :, None]
    return tl.load(ptr + offsets + step * BLOCK_B * 16, mask=mask, other=0).to(tl.int32)


@triton.jit
def _shifted_code(words, i: tl.constexpr, WIDTH: tl.constexpr, SLOT: tl.constexpr):
    """Code row i of a word stream moved to bits [SLOT, SLOT + WIDTH), other bits cleared.

    Codes in the upper half-word come from one shared ``words >> 16``, so that every code
    needs only a left shift (which the compiler may run on the multiply-add pipe) and an AND.
    """
    POSITION: tl.constexpr = i * WIDTH
    if POSITION >= 16:
        view = (words >> 16) << (SLOT - POSITION + 16)
    else:
        view = words << (SLOT - POSITION)
    return view & (((1 << WIDTH) - 1) << SLOT)


@triton.jit
def _code_as_float(w0, w1, i: tl.constexpr, WIDTH0: tl.constexpr, WIDTH1: tl.constexpr):
    """v = 1 + q / 2^b exactly, for code row i: q sits at the top of the mantissa of 1.0."""
    BITS: tl.constexpr = WIDTH0 + WIDTH1
    bits = _shifted_code(w0, i, WIDTH0, 23 - BITS) | 0x3F800000
    if WIDTH1 > 0:
        bits |= _shifted_code(w1, i, WIDTH1, 23 - WIDTH1)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dequant_gemv_kernel(x_ptr, w0_ptr, w1_ptr, s_ptr, z_ptr, y_ptr, N, K, blocks_per_row, stride_xm, stride_ym,
                         WIDTH0: tl.constexpr, WIDTH1: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[m, n] = sum_k x[m, k] w[n, k] on the CUDA cores. Grid: (row blocks, batch rows, K splits).

    A K step reads BLOCK_B interleaving blocks of BLOCK_N rows as a tile [rows, blocks, 16]
    whose last axis is a contiguous run of words; the next step's words are loaded before
    this step's are used, to keep memory busy.

    Codes become floats with a shift and an AND-OR each (``_code_as_float``), and the
    scale and zero are applied once per group's code rows.
    """
    P: tl.constexpr = 32 // WIDTH0
    BITS: tl.constexpr = WIDTH0 + WIDTH1
    ROWS_PER_GROUP: tl.constexpr = GROUP // 16 if GROUP // 16 < P else P  # code rows sharing a group
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    steps = tl.cdiv(blocks_per_row, BLOCK_B)
    per_split = tl.cdiv(steps, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, steps)
    end = tl.minimum(last * BLOCK_B, blocks_per_row)  # this split's blocks end here
    block = tl.arange(0, BLOCK_B)
    c = tl.arange(0, 16)
    offsets = (rows[:, None, None] * blocks_per_row + block[None, :, None]) * 16 + c[None, None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_B, 16), dtype=tl.float32)
    w0 = _load_words(w0_ptr, offsets, first, row_mask, block, end, BLOCK_B)
    w1 = w0
    if WIDTH1 > 0:
        w1 = _load_words(w1_ptr, offsets, first, row_mask, block, end, BLOCK_B)
    for step in range(first, last):
        w0_next = _load_words(w0_ptr, offsets, step + 1, row_mask, block, end, BLOCK_B)
        w1_next = w0_next
        if WIDTH1 > 0:
            w1_next = _load_words(w1_ptr, offsets, step + 1, row_mask, block, end, BLOCK_B)
        blocks = step * BLOCK_B + block
        live_blocks = row_mask[:, None] & (blocks < end)[None, :]
        for i in tl.static_range(P):
            k_row = blocks * (16 * P) + i * 16  # weight k of code row i in word 0 of each block
            k = k_row[:, None] + c[None, :]
            if i % ROWS_PER_GROUP == 0:
                g = k_row // GROUP
                s = tl.load(s_ptr + g[None, :] * N + rows[:, None], mask=live_blocks, other=0.0)[:, :, None]
                z = tl.load(z_ptr + g[None, :] * N + rows[:, None], mask=live_blocks, other=0.0)[:, :, None]
                vx = tl.zeros((BLOCK_N, BLOCK_B, 16), dtype=tl.float32)
                xsum = tl.zeros((BLOCK_B, 16), dtype=tl.float32)
            x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            xsum += x
            vx += _code_as_float(w0, w1, i, WIDTH0, WIDTH1) * x[None, :, :]
            if i % ROWS_PER_GROUP == ROWS_PER_GROUP - 1:
                # sum (1 + q / 2^b) x = sum x + 2^-b sum q x, so s sum (q - z) x = s (2^b vx - (2^b + z) sum x).
                acc += s.to(tl.float32) * ((1 << BITS) * vx - ((1 << BITS) + z.to(tl.float32)) * xsum[None, :, :])
        w0 = w0_next
        w1 = w1_next
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    y_ptrs = y_ptr + m * stride_ym + rows
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, out, mask=row_mask)
    else:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _dequant_gemm_kernel(x_ptr, w0_ptr, w1_ptr, s_ptr, z_ptr, y_ptr, M, N, K, blocks_per_row, stride_xm, stride_ym,
                         WIDTH0: tl.constexpr, WIDTH1: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
                         SPLIT_K: tl.constexpr):
    """y[m, n] = sum_k x[m, k] w[n, k] on the tensor cores. Grid: (row blocks, batch blocks, K splits).

    A K step dequantizes a tile [rows, blocks, code rows, 16], which in that order is the
    natural k order, to fp16 and multiplies it with the matching contiguous slice of x.
    Weight rows are the product's first dimension (y^T = W x^T), so that a batch narrower
    than a tensor-core tile wastes only the narrow side.
    """
    P: tl.constexpr = 32 // WIDTH0
    STEP_K: tl.constexpr = BLOCK_B * 16 * P
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    batch = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    batch_mask = batch < M
    steps = tl.cdiv(blocks_per_row, BLOCK_B)
    per_split = tl.cdiv(steps, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, steps)
    end = tl.minimum(last * BLOCK_B, blocks_per_row)
    block = tl.arange(0, BLOCK_B)
    c = tl.arange(0, 16)
    code_row = tl.arange(0, P)
    offsets = (rows[:, None, None] * blocks_per_row + block[None, :, None]) * 16 + c[None, None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    w0 = _load_words(w0_ptr, offsets, first, row_mask, block, end, BLOCK_B)
    w1 = w0
    if WIDTH1 > 0:
        w1 = _load_words(w1_ptr, offsets, first, row_mask, block, end, BLOCK_B)
    for step in range(first, last):
        w0_next = _load_words(w0_ptr, offsets, step + 1, row_mask, block, end, BLOCK_B)
        w1_next = w0_next
        if WIDTH1 > 0:
            w1_next = _load_words(w1_ptr, offsets, step + 1, row_mask, block, end, BLOCK_B)
        blocks = step * BLOCK_B + block
        q = (w0[:, :, None, :] >> (code_row * WIDTH0)[None, None, :, None]) & ((1 << WIDTH0) - 1)
        if WIDTH1 > 0:
            q |= ((w1[:, :, None, :] >> (code_row * WIDTH1)[None, None, :, None]) & ((1 << WIDTH1) - 1)) << WIDTH0
        g = (blocks[:, None] * (16 * P) + code_row[None, :] * 16) // GROUP
        sz_offsets = g[None, :, :] * N + rows[:, None, None]
        sz_mask = row_mask[:, None, None] & (blocks < end)[None, :, None]
        s = tl.load(s_ptr + sz_offsets, mask=sz_mask, other=0.0)[:, :, :, None]
        z = tl.load(z_ptr + sz_offsets, mask=sz_mask, other=0.0)[:, :, :, None]
        q_float = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0  # 1024 + q, exactly, then q
        w = tl.reshape((q_float - z) * s, (BLOCK_N, STEP_K))
        k = step * STEP_K + tl.arange(0, STEP_K)
        x = tl.load(x_ptr + batch[:, None] * stride_xm + k[None, :], mask=batch_mask[:, None] & (k < K)[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x.to(tl.float16)), acc)
        w0 = w0_next
        w1 = w1_next
    y_ptrs = y_ptr + batch[None, :] * stride_ym + rows[:, None]
    mask = row_mask[:, None] & batch_mask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class DequantConfig:
    block_n: int
    block_m: int  # 1: the CUDA-core GEMV, one activation row per program; >= 16: the tensor cores
    block_b: int = 1  # interleaving blocks (16 words) of a row per K step
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def matmul(x: torch.Tensor, layout: DequantLayout, config: DequantConfig) -> torch.Tensor:
    """x fp16 [M, K] -> y [M, N] in x's dtype."""
    m, k = x.shape
    n = layout.out_features
    if config.block_m != 1 and config.block_m < 16:
        raise ValueError(f"block_m={config.block_m}: 1 (CUDA cores) or 16 and more (tensor cores)")
    if config.split_k > 1:
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    widths = STREAMS[layout.bits]
    args = (x, layout.words[0], layout.words[-1], layout.scales, layout.zeros, y)
    shape = (n, k, layout.words[0].shape[1] // BLOCK_WORDS, x.stride(0), y.stride(0))
    meta = dict(WIDTH0=widths[0], WIDTH1=widths[1] if len(widths) > 1 else 0, GROUP=layout.group,
                BLOCK_N=config.block_n, BLOCK_B=config.block_b, SPLIT_K=config.split_k,
                num_warps=config.num_warps, num_stages=config.num_stages)
    if config.block_m == 1:
        grid = (triton.cdiv(n, config.block_n), m, config.split_k)
        _dequant_gemv_kernel[grid](*args, *shape, **meta)
    else:
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
        _dequant_gemm_kernel[grid](*args, m, *shape, BLOCK_M=config.block_m, **meta)
    return y.to(x.dtype)
