"""Loading lutlm's own compiled libraries (built by setup.py, used through ctypes)."""

from __future__ import annotations

import ctypes
import importlib.util


def load_library(module: str) -> ctypes.CDLL | None:
    """The shared library built as extension `module` (e.g. "lutlm._lutlm_decode_ops"), or
    None where the build left it out (setup.py builds the CPU kernels on x86 only)."""
    spec = importlib.util.find_spec(module)
    return ctypes.CDLL(spec.origin) if spec is not None and spec.origin else None


def return_freed_memory() -> None:
    """Hand freed heap memory back to the system, which glibc's malloc otherwise keeps: after a
    model is built, the packed file's weights and the temporaries of laying them out for the
    kernels are gone, 2 GiB for a 7B-shaped 4-bit model. Does nothing off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
