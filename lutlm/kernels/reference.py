"""Reference mpGEMM: dequantize the packed weight in PyTorch, then multiply.

Plain and slow on purpose: every other kernel is tested against it.
"""

from __future__ import annotations

import torch

from lutlm.formats.packed import PackedWeight


def available() -> bool:
    return True


def prepare(w: PackedWeight) -> torch.Tensor:
    # The dense fp32 matrix is kept, so that the reference path costs one matmul per call.
    return w.dequantize(torch.float32)


def matmul(x: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x.to(handle.dtype), handle.t())
