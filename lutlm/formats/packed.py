"""lutlm's packed low-bit weight: the one format quantizers write and every kernel reads.

Block layout of one linear layer with N output rows and K inputs, b bits, group size G
(G divides K; G == K means one group per row). Like ggml's blocks, every byte is specified:

    planes : uint8 [b, N, K // 8]
        Bit-plane i of the b-bit code q[n, k] (q in 0 .. 2^b - 1) is bit (k % 8), least
        significant first, of planes[i, n, k // 8].  q[n, k] = sum_i 2^i * bit_i[n, k].
    scales : float16 [N, K // G]
    zeros  : float16 [N, K // G]   (in code units, so not necessarily integral)

    w[n, k] = scales[n, k // G] * (q[n, k] - zeros[n, k // G])

Why bit-planes: the table-lookup kernels read one plane at a time, and each plane is
indexed into tables of partial sums of activations (T-MAC), so cost is linear in b.
Mapping bit {0, 1} to sign {-1, +1}, q = (2^b - 1) / 2 + sum_i 2^(i-1) * sign_i, so

    sum_k w[n, k] x[k] = s * ( sum_i 2^(i-1) * sum_k sign_i[n, k] x[k]
                               + ((2^b - 1) / 2 - z) * sum_k x[k] )       (per group)

which is the identity the kernels evaluate: signed sums of activations looked up per
plane, plus one zero-point correction per group.

Ternary weights (BitNet b1.58, t in {-1, 0, +1}) are stored as b = 2 with q = t + 1
and zeros == 1, with ``ternary = True`` so that a kernel may use a ternary table.
That is 2 bits per weight plus one fp16 scale per group.

Kernels convert this canonical layout to their own access order once, at load time
(see each backend's ``prepare``), so the file format does not change with the kernel.
Codes take 1 to 8 bits and any group size dividing K (llama.cpp's Q6_K is 6 bits in groups
of 16, its Q8_0 8 bits with q = int8 + 128 and zero 128): the table-lookup kernels run 1 to 4
bits in groups that are multiples of 32, the CPU dot kernels also 5 to 8 bits and groups of 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclass
class PackedWeight:
    planes: torch.Tensor  # uint8 [bits, N, K // 8]
    scales: torch.Tensor  # float16 [N, K // group_size]
    zeros: torch.Tensor  # float16 [N, K // group_size]
    bits: int
    group_size: int
    ternary: bool = False

    @property
    def out_features(self) -> int:
        return self.planes.shape[1]

    @property
    def in_features(self) -> int:
        return self.planes.shape[2] * 8

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight, fp16 scales and zeros included (zeros not stored for ternary)."""
        side = 16 if self.ternary else 32
        return self.bits + side / self.group_size

    def __post_init__(self) -> None:
        check_config(self.bits, self.group_size, self.in_features, self.ternary)
        n, k = self.out_features, self.in_features
        expect = {
            "planes": ((self.bits, n, k // 8), torch.uint8),
            "scales": ((n, k // self.group_size), torch.float16),
            "zeros": ((n, k // self.group_size), torch.float16),
        }
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"packed weight: {name} has shape {tuple(t.shape)} and dtype {t.dtype}, "
                    f"expected {shape} and {dtype}"
                )

    def codes(self) -> torch.Tensor:
        """The integer codes q as uint8 [N, K]."""
        return unpack_planes(self.planes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w = s * (q - z) as a dense [N, K] matrix: the reference every kernel is tested against."""
        n, k = self.out_features, self.in_features
        q = self.codes().to(torch.float32).view(n, k // self.group_size, self.group_size)
        s = self.scales.to(torch.float32).unsqueeze(-1)
        z = self.zeros.to(torch.float32).unsqueeze(-1)
        return (s * (q - z)).view(n, k).to(dtype)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.planes": self.planes, f"{prefix}.scales": self.scales, f"{prefix}.zeros": self.zeros}


def check_config(bits: int, group_size: int, in_features: int, ternary: bool = False) -> None:
    """Refuse a configuration the format cannot hold, with a message naming the problem."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported: lutlm packs {', '.join(map(str, SUPPORTED_BITS))} bits")
    if ternary and bits != 2:
        raise ValueError(f"ternary weights are stored with 2 bits, not {bits}")
    if in_features % 8:
        raise ValueError(f"in_features={in_features} is not a multiple of 8, which bit-plane packing needs")
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features={in_features}")


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] (values < 2^bits) -> bit-planes uint8 [bits, N, K // 8]."""
    if codes.dim() != 2 or codes.shape[1] % 8:
        raise ValueError(f"codes must be [N, K] with K a multiple of 8, got {tuple(codes.shape)}")
    if int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code is {int(codes.max())}, too large for {bits} bits")
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n, k // 8, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device).view(1, 1, 8)
    # uint8 throughout (the eight bits are disjoint: their sum is at most 255); wider
    # temporaries made packing a 7B model's matrix touch gigabytes of fresh memory.
    return torch.stack([(((c >> i) & 1) << shifts).sum(-1, dtype=torch.uint8) for i in range(bits)])


def unpack_planes(planes: torch.Tensor) -> torch.Tensor:
    """Bit-planes uint8 [bits, N, K // 8] -> codes uint8 [N, K]."""
    bits, n, kb = planes.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device).view(1, 1, 1, 8)
    bitvals = (planes.unsqueeze(-1) >> shifts) & 1  # [bits, N, K//8, 8]
    codes = torch.zeros(n, kb * 8, dtype=torch.uint8, device=planes.device)
    for i in range(bits):
        codes |= bitvals[i].reshape(n, kb * 8) << i
    return codes
