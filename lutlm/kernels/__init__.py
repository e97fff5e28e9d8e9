"""mpGEMM kernels behind one interface.

A backend is a module with three functions:

    available() -> bool                      can it run here (CPU features, a GPU, the built library)
    prepare(w: PackedWeight) -> handle       convert the canonical packed layout to its own, once
    matmul(x, handle) -> y                   x float [..., K] -> y float [..., N]

``reference`` dequantizes in PyTorch and is the ground truth for the others.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

BACKENDS = {
    "reference": "lutlm.kernels.reference",
    "cpu": "lutlm.kernels.cpu",
    "cuda": "lutlm.kernels.gpu",
}


def interpreter_enabled() -> bool:
    """Triton kernels run on the CPU through Triton's interpreter (how CI tests the GPU code)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as e:
        if e.name == "triton":  # an optional extra: say which, not where the import failed
            raise RuntimeError(f"kernel backend {name!r} needs Triton: pip install 'lutlm[gpu]'") from e
        raise
    if not module.available():
        raise RuntimeError(f"kernel backend {name!r} is not available on this machine")
    return module


def default_backend(device: str = "cpu") -> str:
    """The fastest backend that runs on `device`, falling back to the reference."""
    preferred = "cuda" if device.startswith("cuda") else "cpu"
    try:
        get_backend(preferred)
        return preferred
    except (ImportError, RuntimeError):
        return "reference"
