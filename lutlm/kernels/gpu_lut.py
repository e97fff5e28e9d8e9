"""Table-lookup mpGEMV on the GPU (Triton), in the manner of LUT-GEMM.

For each chunk of 8 activations x[8c .. 8c + 7] a program builds, once per K tile, the table of
all 256 partial sums

    T[c, p] = sum_{j < 8, bit j of p set} x[8c + j]

(one small tensor-core product of the chunk matrix with the 16 x 256 bit matrix). A byte of a
weight bit-plane is exactly such a pattern p, so each byte costs one lookup and one add in
place of 8 multiplies, and b-bit weights cost b lookups per 8 weights:

    sum_k q[n, k] x[k] = sum_i 2^i sum_c T[c, plane_i[n, c]]

Per group, w = s (q - z) gives  s * (sum_k q x - z * sum_k x).  ``tl.gather`` keeps the table
in shared memory and reads it by pattern, as LUT-GEMM's kernels do.

GPU layout, built once from the canonical bit-planes (lutlm/formats/packed.py) by ``pack``:

    planes : uint8 [b, K // 8, N]    the canonical planes transposed, so that the rows of one
                                     chunk are adjacent and a block of rows reads them in one run
    scales : float16 [K // g, N]     as in gpu_dequant: transposed, g the kernel group
    zeros  : float16 [K // g, N]

As in gpu_dequant, a layout may be a view of some of another's rows (``LutLayout.rows``), so the
kernel takes the strides of planes and scales rather than deriving them from N.

A batch of M activation rows runs as M programs along the grid's second axis, each with its
own tables: the cost grows with M, which is why larger batches go to gpu_dequant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lutlm.kernels.gpu_dequant import kernel_group

CHUNK = 8  # activations per table, so one plane byte is one index
MIN_BLOCK_K = 16 * CHUNK  # the table is built by tl.dot, which needs 16 chunks or more


@dataclass
class LutLayout:
    planes: torch.Tensor  # uint8 [bits, K // 8, N]
    scales: torch.Tensor  # float16 [K // group, N]
    zeros: torch.Tensor  # float16 [K // group, N]
    bits: int
    group: int
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.planes, self.scales, self.zeros))

    def rows(self, start: int, stop: int) -> "LutLayout":
        """The layout of rows start .. stop - 1, as views of this one's memory."""
        return LutLayout(planes=self.planes[:, :, start:stop], scales=self.scales[:, start:stop],
                         zeros=self.zeros[:, start:stop], bits=self.bits, group=self.group,
                         out_features=stop - start, in_features=self.in_features)


def stack(layouts: list[LutLayout]) -> LutLayout:
    """One layout whose rows are those of `layouts` one after another (same bits, group, K)."""
    first = layouts[0]
    if any((t.bits, t.group, t.in_features) != (first.bits, first.group, first.in_features) for t in layouts):
        raise ValueError("only layouts of the same bits, group and input features stack")
    return LutLayout(planes=torch.cat([t.planes for t in layouts], dim=2),
                     scales=torch.cat([t.scales for t in layouts], dim=1),
                     zeros=torch.cat([t.zeros for t in layouts], dim=1), bits=first.bits, group=first.group,
                     out_features=sum(t.out_features for t in layouts), in_features=first.in_features)


def pack(planes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> LutLayout:
    """Canonical planes [b, N, K // 8] and scales/zeros [N, K // G] -> the GPU layout above."""
    bits, n, kb = planes.shape
    if bits > 4:
        raise ValueError(f"the cuda backend runs 1 to 4 bits, not {bits}")
    g = kernel_group(group_size)
    repeat = group_size // g
    return LutLayout(
        planes=planes.transpose(1, 2).contiguous(),
        scales=scales.repeat_interleave(repeat, dim=1).t().contiguous(),
        zeros=zeros.repeat_interleave(repeat, dim=1).t().contiguous(),
        bits=bits,
        group=g,
        out_features=n,
        in_features=kb * CHUNK,
    )


@triton.jit
def _lut_matmul_kernel(x_ptr, planes_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_xm, stride_ym, stride_plane,
                       stride_chunk, stride_sz,
                       BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[m, n] = sum_k x[m, k] w[n, k]. Grid: (row blocks, batch rows, K splits)."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    CHUNKS: tl.constexpr = BLOCK_K // 8
    GROUP_CHUNKS: tl.constexpr = GROUP // 8
    TILE_GROUPS: tl.constexpr = BLOCK_K // GROUP
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # bit_matrix[j, p] = bit j of p; rows 8..15 are zero and only pad the product's inner size.
    j = tl.arange(0, 16)
    p = tl.arange(0, 256)
    bit_matrix = (((p[None, :] >> j[:, None]) & 1) * (j[:, None] < 8)).to(tl.float16)
    c = tl.arange(0, CHUNKS)
    PLANES: tl.constexpr = 4 if BITS == 3 else BITS  # tl.arange needs a power of two; plane 3 of 3 is masked
    plane = tl.arange(0, PLANES)
    plane_weight = (1 << plane).to(tl.float32)
    tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(tiles, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, tiles)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(first, last):
        k0 = t * BLOCK_K
        k = k0 + c[:, None] * 8 + j[None, :]
        xc = tl.load(x_ptr + m * stride_xm + k, mask=(j[None, :] < 8) & (k < K), other=0.0).to(tl.float16)
        table = tl.dot(xc, bit_matrix)  # [CHUNKS, 256] fp32
        chunk = k0 // 8 + c
        chunk_mask = chunk < K // 8
        # All planes in one lookup, so that the table is stored to shared memory once per tile.
        offsets = plane[None, :, None] * stride_plane + chunk[:, None, None] * stride_chunk + rows[None, None, :]
        mask = chunk_mask[:, None, None] & (plane < BITS)[None, :, None] & row_mask[None, None, :]
        pattern = tl.load(planes_ptr + offsets, mask=mask, other=0).to(tl.int32)
        found = tl.gather(table, tl.reshape(pattern, (CHUNKS, PLANES * BLOCK_N)), axis=1)
        sums = tl.sum(tl.reshape(found, (CHUNKS, PLANES, BLOCK_N)) * plane_weight[None, :, None], axis=1)
        # Per group: s * (sum q x - z * sum x).
        qx = tl.sum(tl.reshape(sums, (TILE_GROUPS, GROUP_CHUNKS, BLOCK_N)), axis=1)
        xsum = tl.sum(tl.reshape(tl.sum(xc.to(tl.float32), axis=1), (TILE_GROUPS, GROUP_CHUNKS)), axis=1)
        g = k0 // GROUP + tl.arange(0, TILE_GROUPS)
        gmask = (g < K // GROUP)[:, None] & row_mask[None, :]
        s = tl.load(s_ptr + g[:, None] * stride_sz + rows[None, :], mask=gmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g[:, None] * stride_sz + rows[None, :], mask=gmask, other=0.0).to(tl.float32)
        acc += tl.sum(s * (qx - z * xsum[:, None]), axis=0)
    y_ptrs = y_ptr + m * stride_ym + rows
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=row_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask)


@dataclass(frozen=True)
class LutConfig:
    block_n: int
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def matmul(x: torch.Tensor, layout: LutLayout, config: LutConfig) -> torch.Tensor:
    """x fp16 [M, K] -> y [M, N] in x's dtype."""
    m, k = x.shape
    n = layout.out_features
    if config.block_k < MIN_BLOCK_K or config.block_k % layout.group:
        raise ValueError(
            f"block_k={config.block_k}: the table-lookup kernel needs a multiple of the group "
            f"({layout.group}) that is at least {MIN_BLOCK_K}"
        )
    if config.split_k > 1:
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config.block_n), m, config.split_k)
    _lut_matmul_kernel[grid](
        x, layout.planes, layout.scales, layout.zeros, y, n, k, x.stride(0), y.stride(0), layout.planes.stride(0),
        layout.planes.stride(1), layout.scales.stride(0),
        BITS=layout.bits, GROUP=layout.group, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=config.split_k, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y.to(x.dtype)
