"""Dequantizing mpGEMM on the GPU (Triton): the packed bytes are read once and the codes are
unpacked in registers, never written back as floats, except on the dense path below.

Three ways to multiply, over one layout; the dispatcher (lutlm.kernels.gpu) picks per shape and
batch from its tuning table:

* the dp4a GEMV (a few tokens, one a program), ``_dp4a_gemv_kernel``: one launch that rounds
  the fp16 activations to int8 per kernel group (absmax / 127, as llama.cpp's CUDA GEMV does)
  and multiplies them with the weight codes four at a time by the byte dot product ``dp4a``
  (one instruction for four multiply-adds; unpacking is one shift and one AND per four codes).
  Under Triton's interpreter (no GPU) ``dp4a`` is emulated byte by byte. For a decoder it also
  takes the MLP's gate/up output as it is (SiLU(gate) * up computed as it loads), and starts
  before the previous kernel ends (PDL, gpu_ops).
* the tensor-core GEMM (``_dequant_gemm_kernel``, 16 tokens and more): each word is read once
  and turns into its codes' fp16 values in the registers of the thread that read it (shifts,
  then an inline PTX byte permute and LOP3 per two codes: the 0x6400 trick below), is scaled
  there by a per-row scale and zero loaded a K step ahead, and goes to ``tl.dot`` as the
  register operand (wgmma's A on Hopper; Triton moves the tile into that operand's layout
  through shared memory) against the activations, K-major.
* the dense path (``DequantConfig.dense``): ``_dequantize_kernel`` writes the whole weight in
  fp16 to a shared workspace and cuBLAS (``torch.matmul``) multiplies; for wide batches, where
  cuBLAS's tiling is worth a write and a read of the fp16 weight.

GPU layout, built once from the canonical bit-planes (lutlm/formats/packed.py) by ``pack``:

    A b-bit code q is stored as word streams of widths STREAMS[b], low bits first
    (b = 3: q = q0 + 4 * q1, a 2-bit and a 1-bit stream, so 3 bits cost 3 bits).
    words_j : int32 [N, Kp // P_j]      P_j = 32 // width_j codes a word; Kp = K rounded up to
                                        a multiple of 128 (zero codes past K)
        Word t of a row holds the codes of weights k = t * P + 4 * i + j  (i < P / 4, j < 4)
        at bits  8 * j + width * i.  So  (word >> width * i) & 0x..03030303  puts the codes of
        four consecutive weights in the four bytes of a register, ready for dp4a, and every
        byte stays inside one group.
    scales  : float16 [Kp // g, N]      transposed, so that a block of rows reads them in one run
    zeros   : float16 [Kp // g, N]      in code units, as in the canonical format; zero past K
    w[n, k] = scales[k // g, n] * (q[n, k] - zeros[k // g, n])

A layout may be a view of some of another's rows (``DequantLayout.rows``: the GPU decoder runs
q/k/v and gate/up stacked and the model's own linears read views of those): the words are then
a run of whole rows, and scales and zeros are columns of the wider arrays, so the kernels step
over scale rows by ``scales.stride(0)``, not N.

Codes become fp16 by the 0x6400 trick: the fp16 with bits 0x6400 | q is exactly 1024 + q, so
(0x6400 | q) - 1024 is q with no conversion instruction.

g, the kernel's group, is the largest power of two <= 128 dividing the format's group size G
(Triton tiles are powers of two); where g < G each scale and zero is repeated G // g times.

Accuracy: the GEMM is exact up to fp16 rounding of (q - z) * s (relative 2^-11) and fp32
accumulation. The GEMV adds the int8 rounding of the activations: each x[k] is off by at most
amax / 254 of its group, so |error| <= sum_k |w[n, k]| * amax(group of k) / 254 (+ fp32 rounding,
and with split-K one fp16 rounding of the running sum per split); tests/test_kernels_gpu.py
asserts exactly this bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lutlm.kernels import interpreter_enabled
from lutlm.kernels.gpu_ops import pdl_supported, start_dependents, wait_for_inputs

STREAMS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}
K_MULTIPLE = 128  # Kp: whole words of every stream and whole GEMM steps
MAX_KERNEL_GROUP = 128


@dataclass
class DequantLayout:
    words: tuple[torch.Tensor, ...]  # one int32 [N, Kp // P_j] per stream
    bits: int
    scales: torch.Tensor  # float16 [Kp // group, N]
    zeros: torch.Tensor  # float16 [Kp // group, N]
    group: int
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.words, self.scales, self.zeros))

    @property
    def padded_in_features(self) -> int:
        return self.scales.shape[0] * self.group

    def rows(self, start: int, stop: int) -> "DequantLayout":
        """The layout of rows start .. stop - 1, as views of this one's memory."""
        return DequantLayout(words=tuple(w[start:stop] for w in self.words), bits=self.bits,
                             scales=self.scales[:, start:stop], zeros=self.zeros[:, start:stop], group=self.group,
                             out_features=stop - start, in_features=self.in_features)


def stack(layouts: list[DequantLayout]) -> DequantLayout:
    """One layout whose rows are those of `layouts` one after another (same bits, group, K)."""
    first = layouts[0]
    if any((d.bits, d.group, d.in_features) != (first.bits, first.group, first.in_features) for d in layouts):
        raise ValueError("only layouts of the same bits, group and input features stack")
    return DequantLayout(words=tuple(torch.cat(streams) for streams in zip(*(d.words for d in layouts))),
                         bits=first.bits, scales=torch.cat([d.scales for d in layouts], dim=1),
                         zeros=torch.cat([d.zeros for d in layouts], dim=1), group=first.group,
                         out_features=sum(d.out_features for d in layouts), in_features=first.in_features)


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
    if bits not in STREAMS:
        raise ValueError(f"the cuda backend runs 1 to 4 bits, not {bits}")
    n, k = codes.shape
    padded = -(-k // K_MULTIPLE) * K_MULTIPLE
    g = kernel_group(group_size)
    codes = torch.nn.functional.pad(codes.to(torch.int64), (0, padded - k))
    words, shift = [], 0
    for width in STREAMS[bits]:
        per_word = 32 // width
        part = ((codes >> shift) & ((1 << width) - 1)).view(n, padded // per_word, per_word // 4, 4)
        i = torch.arange(per_word // 4, device=codes.device).view(1, 1, -1, 1)
        j = torch.arange(4, device=codes.device).view(1, 1, 1, -1)
        packed = (part << (8 * j + width * i)).sum((2, 3))  # disjoint fields: the sum is an OR
        words.append(torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).contiguous())
        shift += width
    pad_groups = (padded - k) // g

    def per_kernel_group(t: torch.Tensor) -> torch.Tensor:
        t = t.repeat_interleave(group_size // g, dim=1)
        return torch.nn.functional.pad(t, (0, pad_groups)).t().contiguous()

    return DequantLayout(words=tuple(words), bits=bits, scales=per_kernel_group(scales),
                         zeros=per_kernel_group(zeros), group=g, out_features=n, in_features=k)


@triton.jit
def _dp4a(a, b, c, EMULATE: tl.constexpr):
    """c + the dot product of a's four bytes (unsigned) with b's four bytes (signed)."""
    if EMULATE:
        for j in tl.static_range(4):
            c += ((a >> (8 * j)) & 0xFF) * ((b << (24 - 8 * j)) >> 24)
        return c
    else:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _round_to_int(x, EMULATE: tl.constexpr):
    """x rounded to the nearest integer, as int32: one cvt.rni on the GPU."""
    if EMULATE:
        return tl.floor(x + 0.5).to(tl.int32)
    else:
        return libdevice.float2int_rn(x)


@triton.jit
def _words(w_ptr, padded_k, rows, row_mask, k0, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr):
    """One word stream's words of weights k0 .. k0 + BLOCK_K, [rows, BLOCK_K // P]: each row's
    words are one contiguous run (16-byte loads: rows start at multiples of 16 bytes as Kp is a
    multiple of 128); zero past Kp."""
    P: tl.constexpr = 32 // WIDTH
    t = k0 // P + tl.arange(0, BLOCK_K // P)
    words_per_row = tl.multiple_of(padded_k // P, 4)
    return tl.load(w_ptr + rows[:, None] * words_per_row + t[None, :],
                   mask=row_mask[:, None] & (t < words_per_row)[None, :], other=0)


@triton.jit
def _int8_activations(x, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    """Activations fp32 [BLOCK_K] rounded to int8 per group (absmax / 127): four a word, packed in
    k order [BLOCK_K // 4], with each group's step dx = amax / 127 and sum of the int8 values."""
    xg = tl.reshape(x, (BLOCK_K // GROUP, GROUP))
    amax = tl.max(tl.abs(xg), axis=1)
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    q = _round_to_int(xg * inv[:, None], EMULATE)
    q4 = tl.reshape(q, (BLOCK_K // 4, 4))
    packed = tl.sum((q4 & 0xFF) << (8 * tl.arange(0, 4))[None, :], axis=1)  # disjoint bytes: the sum is an OR
    return packed, amax / 127.0, tl.sum(q, axis=1)


@triton.jit
def _stream_dot(words, x_packed, WIDTH: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    """For one word stream (_words): the sum over each group's weights of code * int8 activation,
    [rows, BLOCK_K // GROUP]. The bytes of (word t >> WIDTH * i) meet packed activations t P / 4 + i."""
    P: tl.constexpr = 32 // WIDTH
    MASK: tl.constexpr = ((1 << WIDTH) - 1) * 0x01010101
    x_by_shift = tl.reshape(x_packed, (BLOCK_K // P, P // 4))
    shift = tl.arange(0, P // 4)
    acc = tl.zeros(words.shape, dtype=tl.int32)
    for i in tl.static_range(P // 4):
        x_i = tl.sum(tl.where(shift[None, :] == i, x_by_shift, 0), axis=1)  # a column: the sum picks it
        acc = _dp4a((words >> (WIDTH * i)) & MASK, x_i[None, :], acc, EMULATE)
    return tl.sum(tl.reshape(acc, (BLOCK_N, BLOCK_K // GROUP, GROUP // P)), axis=2)


@triton.jit
def _weights(w0_ptr, w1_ptr, s_ptr, z_ptr, stride_sz, padded_k, rows, row_mask, step, WIDTH0: tl.constexpr,
             WIDTH1: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weights of GEMV step `step`: the words of both streams (the second is the first again
    where there is one stream), and the scales and zeros [rows, BLOCK_K // GROUP] (zero past Kp).
    Every load is masked, so any step is safe to ask for."""
    k0 = step * BLOCK_K
    w0 = _words(w0_ptr, padded_k, rows, row_mask, k0, WIDTH0, BLOCK_K)
    w1 = w0
    if WIDTH1 > 0:
        w1 = _words(w1_ptr, padded_k, rows, row_mask, k0, WIDTH1, BLOCK_K)
    g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    sz_offsets = g[None, :] * stride_sz + rows[:, None]
    sz_mask = row_mask[:, None] & (g < padded_k // GROUP)[None, :]
    s = tl.load(s_ptr + sz_offsets, mask=sz_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sz_offsets, mask=sz_mask, other=0.0).to(tl.float32)
    return w0, w1, s, z


@triton.jit
def _activations(x_row, K, step, GATED: tl.constexpr, BLOCK_K: tl.constexpr):
    """The activations of GEMV step `step`, fp32 [BLOCK_K] (zero past K). GATED: the row holds
    [gate | up], 2 K wide, and the activation is SiLU(gate) * up (the MLP's, fused here so that
    it costs no launch and is not rounded to fp16)."""
    k = step * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
    if GATED:
        x = x / (1.0 + tl.exp(-x)) * tl.load(x_row + K + k, mask=k < K, other=0.0).to(tl.float32)
    return x


@triton.jit
def _dp4a_gemv_kernel(x_ptr, w0_ptr, w1_ptr, s_ptr, z_ptr, y_ptr, N, K, padded_k, stride_xm, stride_ym,
                      stride_sz, WIDTH0: tl.constexpr, WIDTH1: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
                      EMULATE: tl.constexpr):
    """y[m, n] = sum_k x[m, k] w[n, k]. Grid: (row blocks, batch rows, K splits).

    A step covers BLOCK_K weights of each row (whole groups): the step's activations are rounded
    to int8 once for the program's rows, multiplied with the codes by dp4a, and each group adds
    s * dx * (sum q x_q - z * sum x_q). Every row block rounds the same activations again: a few
    operations per activation, far cheaper than a second launch. The loads of the next step are
    issued before the arithmetic of this one, so that the program always has memory requests in
    flight (Triton's pipeliner only stages the loads that feed tl.dot). With PDL, the first
    step's weights are requested before waiting for the kernel that writes the activations.
    """
    start_dependents(PDL)
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    x_row = x_ptr + m * stride_xm
    steps = tl.cdiv(padded_k, BLOCK_K)
    per_split = tl.cdiv(steps, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, steps)
    acc = tl.zeros((BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
    w0, w1, s, z = _weights(w0_ptr, w1_ptr, s_ptr, z_ptr, stride_sz, padded_k, rows, row_mask, first, WIDTH0, WIDTH1,
                            GROUP, BLOCK_K)
    wait_for_inputs(PDL)
    x = _activations(x_row, K, first, GATED, BLOCK_K)
    for step in range(first, last):
        # the last step fetches itself again: cache hits, and no branch in the loop
        following = tl.minimum(step + 1, last - 1)
        w0_next, w1_next, s_next, z_next = _weights(w0_ptr, w1_ptr, s_ptr, z_ptr, stride_sz, padded_k, rows, row_mask,
                                                    following, WIDTH0, WIDTH1, GROUP, BLOCK_K)
        x_next = _activations(x_row, K, following, GATED, BLOCK_K)
        x_packed, dx, x_sum = _int8_activations(x, GROUP, BLOCK_K, EMULATE)
        qx = _stream_dot(w0, x_packed, WIDTH0, GROUP, BLOCK_N, BLOCK_K, EMULATE)
        if WIDTH1 > 0:
            qx += _stream_dot(w1, x_packed, WIDTH1, GROUP, BLOCK_N, BLOCK_K, EMULATE) << WIDTH0
        acc += s * dx[None, :] * (qx.to(tl.float32) - z * x_sum.to(tl.float32)[None, :])
        x, w0, w1, s, z = x_next, w0_next, w1_next, s_next, z_next
    out = tl.sum(acc, axis=1)
    y_ptrs = y_ptr + m * stride_ym + rows
    if SPLIT_K > 1:  # into a zeroed output
        tl.atomic_add(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=row_mask)


def _magic_asm(bits: int) -> tl.constexpr:
    """PTX for `_biased4`, two codes at a time: a byte permute puts the low halves of two words side
    by side, and one LOP3 keeps each half's code bits and ORs in 0x6400."""
    mask = ((1 << bits) - 1) * 0x00010001
    return tl.constexpr(f"{{ .reg .b32 t; prmt.b32 t, $1, $2, 0x5410; lop3.b32 $0, t, {mask}, 0x64006400, 0xea; }}")


_MAGIC_ASM_1, _MAGIC_ASM_2, _MAGIC_ASM_3, _MAGIC_ASM_4 = (_magic_asm(b) for b in (1, 2, 3, 4))


@triton.jit
def _biased4(c, BITS: tl.constexpr, EMULATE: tl.constexpr):
    """Words c [R, W] holding one code in the low BITS bits of each byte -> fp16 [R, W, 4] whose
    [..., j] is 1024 + the code of byte j: fp16 0x6400 | q is exactly 1024 + q (q < 1024)."""
    # c >> 8 j on a new axis; joined so that flattening walks j = 0, 1, 2, 3
    c4 = tl.reshape(tl.join(tl.join(c, c >> 16), tl.join(c >> 8, c >> 24)), (c.shape[0], c.shape[1], 4))
    if EMULATE:
        return ((c4 & ((1 << BITS) - 1)) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        # Each output element depends on its own input element only, so the result is right
        # whichever two elements Triton hands one asm call (their place in the layout is its choice).
        if BITS == 1:
            asm: tl.constexpr = _MAGIC_ASM_1
        elif BITS == 2:
            asm: tl.constexpr = _MAGIC_ASM_2
        elif BITS == 3:
            asm: tl.constexpr = _MAGIC_ASM_3
        else:
            asm: tl.constexpr = _MAGIC_ASM_4
        return tl.inline_asm_elementwise(asm, "=r,r,r", [c4], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _word_bytes(w0, w1x, I: tl.constexpr, WIDTH0: tl.constexpr, WIDTH1: tl.constexpr):
    """The codes of weights 4 I + j (j < 4) of each stream-0 word, one a byte (with stream 1's bit
    on top for 3 bits; the bits above the code are left for _biased4's mask)."""
    a = w0
    if WIDTH0 * I > 0:
        a = w0 >> (WIDTH0 * I)
    if WIDTH1 == 0:
        return a
    else:  # 3 bits = 2 + 1: bit I of the 1-bit word's bytes moves to bit 2, under the 2-bit code
        if I < 2:
            b = w1x << (2 - I)
        elif I == 2:
            b = w1x
        else:
            b = w1x >> (I - 2)
        return (a & 0x03030303) | (b & ~0x03030303)


@triton.jit
def _biased_tree(w0, w1x, I0: tl.constexpr, STEP: tl.constexpr, COUNT: tl.constexpr, WIDTH0: tl.constexpr,
                 WIDTH1: tl.constexpr, EMULATE: tl.constexpr):
    """_biased4 of I = I0, I0 + STEP, ... (COUNT of them), joined on new trailing axes so that
    flattening them walks I in increasing order."""
    if COUNT == 1:
        return _biased4(_word_bytes(w0, w1x, I0, WIDTH0, WIDTH1), WIDTH0 + WIDTH1, EMULATE)
    else:
        return tl.join(_biased_tree(w0, w1x, I0, 2 * STEP, COUNT // 2, WIDTH0, WIDTH1, EMULATE),
                       _biased_tree(w0, w1x, I0 + STEP, 2 * STEP, COUNT // 2, WIDTH0, WIDTH1, EMULATE))


@triton.jit
def _biased_codes(w0_ptr, w1_ptr, padded_k, rows, row_mask, step, WIDTH0: tl.constexpr, WIDTH1: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    """fp16 [rows, BLOCK_K]: 1024 + the code of each weight of K step `step`. Each word is read once
    and its P codes are spread on new axes by joins, which Triton keeps in the reading thread's
    registers for the large tiles (no data moves between threads): the four codes of bytes j < 4
    (_biased4), the P / 4 shifts of the word (_biased_tree), and a permute of those axes puts
    them in k order."""
    P: tl.constexpr = 32 // WIDTH0
    WORDS: tl.constexpr = BLOCK_K // P
    t = tl.arange(0, WORDS)
    w0 = tl.load(w0_ptr + rows[:, None] * (padded_k // P) + step * WORDS + t[None, :], mask=row_mask[:, None], other=0)
    if WIDTH1 > 0:  # 3 bits: word t // 2 of the 1-bit stream, shifted by 4 for odd t, meets word t
        t1 = tl.arange(0, WORDS // 2)
        w1 = tl.load(w1_ptr + rows[:, None] * (padded_k // 32) + step * (WORDS // 2) + t1[None, :],
                     mask=row_mask[:, None], other=0)
        w1x = tl.reshape(tl.join(w1, w1 >> 4), (BLOCK_N, WORDS))
    else:
        w1x = w0
    h = _biased_tree(w0, w1x, 0, 1, P // 4, WIDTH0, WIDTH1, EMULATE)  # [rows, WORDS, j, I bits]
    if P == 8:
        h = tl.permute(h, (0, 1, 3, 2))
    elif P == 16:
        h = tl.permute(h, (0, 1, 3, 4, 2))
    else:
        h = tl.permute(h, (0, 1, 3, 4, 5, 2))
    return tl.reshape(h, (BLOCK_N, BLOCK_K))  # k = word * P + 4 I + j


@triton.jit
def _scales_zeros(s_ptr, z_ptr, stride_sz, rows, row_mask, step, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scales and zeros of K step `step`: [rows, 1] when the step lies in one group (BLOCK_K <=
    GROUP), else [rows, BLOCK_K]."""
    if BLOCK_K <= GROUP:
        g = (step * BLOCK_K) // GROUP
        s = tl.load(s_ptr + g * stride_sz + rows, mask=row_mask, other=0.0)[:, None]
        z = tl.load(z_ptr + g * stride_sz + rows, mask=row_mask, other=0.0)[:, None]
    else:
        k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        sz_offsets = (k // GROUP)[None, :] * stride_sz + rows[:, None]
        s = tl.load(s_ptr + sz_offsets, mask=row_mask[:, None], other=0.0)
        z = tl.load(z_ptr + sz_offsets, mask=row_mask[:, None], other=0.0)
    return s, z


@triton.jit
def _dequantized_tile(w0_ptr, w1_ptr, padded_k, rows, row_mask, step, s, z, WIDTH0: tl.constexpr,
                      WIDTH1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    """Weights [rows, BLOCK_K] of K step `step` in fp16, given its scales and zeros (_scales_zeros).
    BLOCK_K divides Kp (a multiple of 128) and is at least 32."""
    q = _biased_codes(w0_ptr, w1_ptr, padded_k, rows, row_mask, step, WIDTH0, WIDTH1, BLOCK_N, BLOCK_K,
                      EMULATE) - 1024.0  # exact
    return (q - z) * s


@triton.jit
def _dequant_gemm_kernel(x_ptr, w0_ptr, w1_ptr, s_ptr, z_ptr, y_ptr, M, N, K, padded_k, stride_xm, stride_ym,
                         stride_sz, WIDTH0: tl.constexpr, WIDTH1: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
                         EMULATE: tl.constexpr):
    """y[m, n] = sum_k x[m, k] w[n, k] on the tensor cores. Grid: (row blocks, batch blocks, K splits).

    Weight rows are the product's first dimension (y^T = W x^T): the dequantized tile is the
    operand that comes from registers (wgmma's A on Hopper), the activations are loaded
    K-major as its B, and a batch narrower than a tensor-core tile wastes only the narrow side.
    A tile's scales and zeros are loaded one K step ahead, so that their latency hides behind
    a step. EVEN_*: the dimension is a whole number of tiles, and its masks go.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if EVEN_N:
        row_mask = tl.full((BLOCK_N,), 1, tl.int1)
    batch = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    batch_mask = batch < M
    if EVEN_M:
        batch_mask = tl.full((BLOCK_M,), 1, tl.int1)
    steps = padded_k // BLOCK_K
    if SPLIT_K > 1:
        per_split = tl.cdiv(steps, SPLIT_K)
        first = tl.program_id(2) * per_split
        last = tl.minimum(first + per_split, steps)
    else:
        first = 0
        last = steps
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # (a split past the last step runs no step; its first load stays inside the arrays)
    s, z = _scales_zeros(s_ptr, z_ptr, stride_sz, rows, row_mask, tl.minimum(first, steps - 1), GROUP, BLOCK_K)
    for step in range(first, last):
        w = _dequantized_tile(w0_ptr, w1_ptr, padded_k, rows, row_mask, step, s, z, WIDTH0, WIDTH1, BLOCK_N,
                              BLOCK_K, EMULATE)
        s, z = _scales_zeros(s_ptr, z_ptr, stride_sz, rows, row_mask, tl.minimum(step + 1, last - 1), GROUP, BLOCK_K)
        k = step * BLOCK_K + kk
        k_mask = k < K
        if EVEN_K:
            k_mask = tl.full((BLOCK_K,), 1, tl.int1)
        xt = tl.load(x_ptr + batch[None, :] * stride_xm + k[:, None], mask=batch_mask[None, :] & k_mask[:, None],
                     other=0.0)
        acc = tl.dot(w, xt.to(tl.float16), acc)
    y_ptrs = y_ptr + batch[None, :] * stride_ym + rows[:, None]
    mask = row_mask[:, None] & batch_mask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(w0_ptr, w1_ptr, s_ptr, z_ptr, out_ptr, N, K, padded_k, stride_sz,
                       WIDTH0: tl.constexpr, WIDTH1: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr):
    """out[n, k] = w[n, k] in fp16, for k < K. Grid: (row blocks, K steps)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    step = tl.program_id(1)
    s, z = _scales_zeros(s_ptr, z_ptr, stride_sz, rows, row_mask, step, GROUP, BLOCK_K)
    w = _dequantized_tile(w0_ptr, w1_ptr, padded_k, rows, row_mask, step, s, z, WIDTH0, WIDTH1, BLOCK_N, BLOCK_K,
                          EMULATE)
    k = step * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + k[None, :], w, mask=row_mask[:, None] & (k < K)[None, :])


@dataclass(frozen=True)
class DequantConfig:
    block_n: int
    block_m: int  # 1: the dp4a GEMV, one activation row per program; >= 16: the tensor cores
    block_k: int = 128  # weights of a row per K step (GEMV: rounded up to whole kernel groups)
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    dense: bool = False  # instead: dequantize into an fp16 workspace (block_n x block_k tiles), then cuBLAS


_WORKSPACES: dict[torch.device, torch.Tensor] = {}


def _workspace(n: int, k: int, device: torch.device) -> torch.Tensor:
    """An fp16 [n, k] scratch matrix, shared by all weights on the device (one product at a time)."""
    buffer = _WORKSPACES.get(device)
    if buffer is None or buffer.numel() < n * k:
        buffer = _WORKSPACES[device] = torch.empty(n * k, dtype=torch.float16, device=device)
    return buffer[: n * k].view(n, k)


def is_gemv(config: DequantConfig) -> bool:
    """Whether the configuration runs the dp4a GEMV."""
    return config.block_m == 1 and not config.dense


def matmul(x: torch.Tensor, layout: DequantLayout, config: DequantConfig, gated: bool = False,
           overlap: bool = False) -> torch.Tensor:
    """x fp16 [M, K] -> y [M, N] in x's dtype. The dp4a GEMV also takes
    gated: x is [M, 2K], gate then up, and the product is of SiLU(gate) * up;
    overlap: launch with PDL where the GPU supports it (gpu_ops): the first weights are read
    before the previous kernel has finished, so only for weights that kernel does not write."""
    m = x.shape[0]
    k = layout.in_features
    n = layout.out_features
    if (gated or overlap) and not is_gemv(config):
        raise ValueError("gated activations and launch overlap are the dp4a GEMV's (block_m=1) alone")
    if not config.dense and config.block_m != 1 and config.block_m < 16:
        raise ValueError(f"block_m={config.block_m}: 1 (dp4a GEMV) or 16 and more (tensor cores)")
    if (config.dense or config.block_m != 1) and (K_MULTIPLE % config.block_k or config.block_k < 32):
        raise ValueError(f"block_k={config.block_k}: the dequantizing tiles need a divisor of {K_MULTIPLE}, >= 32")
    widths = STREAMS[layout.bits]
    meta = dict(WIDTH0=widths[0], WIDTH1=widths[1] if len(widths) > 1 else 0, GROUP=layout.group,
                BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages)
    weights = (layout.words[0], layout.words[-1], layout.scales, layout.zeros)
    if config.dense:
        w = _workspace(n, k, x.device)
        grid = (triton.cdiv(n, config.block_n), layout.padded_in_features // config.block_k)
        _dequantize_kernel[grid](*weights, w, n, k, layout.padded_in_features, layout.scales.stride(0),
                                 BLOCK_K=config.block_k,
                                 EMULATE=interpreter_enabled(), **meta)
        return torch.matmul(x, w.t())
    if config.block_m == 1:
        # One launch, or a memset and one launch where split-K programs add into y atomically.
        y = (torch.zeros if config.split_k > 1 else torch.empty)(m, n, device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(n, config.block_n), m, config.split_k)
        block_k = max(1, config.block_k // layout.group) * layout.group
        pdl = overlap and pdl_supported(x.device)
        _dp4a_gemv_kernel[grid](x, *weights, y, n, k, layout.padded_in_features, x.stride(0), y.stride(0),
                                layout.scales.stride(0),
                                BLOCK_K=block_k, SPLIT_K=config.split_k, GATED=gated, PDL=pdl,
                                EMULATE=interpreter_enabled(), launch_pdl=pdl, **meta)
        return y
    if config.split_k > 1:  # split-K programs add fp32 partial sums atomically
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
    _dequant_gemm_kernel[grid](x, *weights, y, m, n, k, layout.padded_in_features, x.stride(0), y.stride(0),
                               layout.scales.stride(0),
                               BLOCK_M=config.block_m, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
                               EVEN_N=n % config.block_n == 0, EVEN_M=m % config.block_m == 0,
                               EVEN_K=k == layout.padded_in_features, EMULATE=interpreter_enabled(), **meta)
    return y.to(x.dtype)
