"""The model's one linear-layer boundary.

The model builds every projection with ``torch.nn.Linear``; quantized models replace those
modules with ``PackedLinear``, which hands the product to a kernel backend. The model
code never changes with the weight format.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from lutlm.formats.packed import PackedWeight
from lutlm.kernels import default_backend, get_backend


class PackedLinear(nn.Module):
    """A packed weight on a kernel backend. It keeps the backend's prepared weight and the
    format's description, not the PackedWeight: a caller that drops its packed weights (as the
    command line does once the model is built) holds the weights once, in the kernel's layout."""

    def __init__(self, weight: PackedWeight | None, backend: str | None = None, *, handle=None,
                 bits: int | None = None, group_size: int | None = None, ternary: bool = False):
        """From a PackedWeight, which `backend` prepares, or from a `handle` the backend already
        prepared (a GGUF's blocks laid out for the kernels directly) with its bits and group size."""
        super().__init__()
        self.backend_name = backend or default_backend("cpu")
        self._backend = get_backend(self.backend_name)
        if weight is not None:
            bits, group_size, ternary = weight.bits, weight.group_size, weight.ternary
            self._handle = self._backend.prepare(weight)
            self.in_features, self.out_features = weight.in_features, weight.out_features
        elif handle is None or bits is None or group_size is None:
            raise ValueError("a PackedLinear needs a packed weight, or a prepared handle with its bits and group size")
        else:
            self._handle = handle
            self.in_features, self.out_features = handle.in_features, handle.out_features
        self.bits, self.group_size, self.ternary = bits, group_size, ternary

    @property
    def kernel(self) -> str:
        """Which kernel family computes the product: "lut" (table lookup), "dot" (int8 dot
        products of unpacked codes), or the backend's name where it has one family."""
        return getattr(self._handle, "kernel", self.backend_name)

    @property
    def handle(self):
        """The backend's prepared weight (for callers that drive the backend directly)."""
        return self._handle

    def share_handle(self, handle) -> None:
        """Read the weight through `handle`, another prepared weight of the same rows (a view
        into stacked weights: lutlm.gpu_decode), and drop this linear's own."""
        if (handle.out_features, handle.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"a {handle.out_features}x{handle.in_features} handle cannot stand for a "
                             f"{self.out_features}x{self.in_features} weight")
        self._handle = handle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._backend.matmul(x, self._handle)

    def extra_repr(self) -> str:
        kind = "ternary" if self.ternary else f"{self.bits}-bit"
        return (f"in={self.in_features}, out={self.out_features}, {kind}, group={self.group_size}, "
                f"backend={self.backend_name}, kernel={self.kernel}")


def replace_linears(model: nn.Module, packed: dict[str, PackedWeight | PackedLinear], backend: str | None = None) -> None:
    """Swap each nn.Linear named in `packed` (module name, no '.weight') for a PackedLinear
    (made from a PackedWeight on `backend`, or one already made)."""
    for name, weight in packed.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not isinstance(old, (nn.Linear, PackedLinear)):
            raise TypeError(f"{name} is a {type(old).__name__}, not a linear layer")
        if (old.out_features, old.in_features) != (weight.out_features, weight.in_features):
            raise ValueError(
                f"{name}: packed weight is {weight.out_features}x{weight.in_features}, "
                f"the model expects {old.out_features}x{old.in_features}"
            )
        setattr(parent, child, weight if isinstance(weight, PackedLinear) else PackedLinear(weight, backend))


def linear_summary(model: nn.Module, tensor_types: dict[str, str]) -> str:
    """How a model's linears compute, by their type in the file (`tensor_types`, a checkpoint's),
    e.g. "210 x Q4_1 -> lut 4-bit g32, 1 x Q8_0 -> dot 8-bit g32, 0 float linears"; float
    linears say what they hold."""
    kinds, floats, float_bytes = Counter(), Counter(), 0
    for name, module in model.named_modules():
        if not hasattr(module, "in_features"):
            continue
        source = tensor_types.get(f"{name}.weight")
        if source is None and name == "lm_head":  # a tied head: the embedding's blocks
            source = tensor_types.get("model.embed_tokens.weight")
        if isinstance(module, PackedLinear):
            kind = "ternary" if module.ternary else f"{module.bits}-bit"
            two_level = getattr(module.handle, "scale_layout", "f16") != "f16"  # the K-quants' own scales
            kinds[f"{source or 'packed'} -> {module.kernel} {kind} g{module.group_size}"
                  f"{' k-scales' if two_level else ''}"] += 1
        else:
            floats[source or "float"] += 1
            float_bytes += module.weight.numel() * module.weight.element_size()
    parts = [f"{n} x {k}" for k, n in kinds.most_common()]
    if floats:
        parts.append(f"{sum(floats.values())} float linears ({', '.join(f'{t} x{n}' for t, n in floats.most_common())}, "
                     f"{float_bytes / 2**20:.0f} MiB)")
    else:
        parts.append("0 float linears")
    return ", ".join(parts)
