"""Native decode of ggml blocks into groups (csrc/ggml_decode.cpp), through ctypes.

`ggml_groups_native` returns what lutlm.formats.gguf_packed.ggml_groups returns, byte for
byte (codes, fp16 scales and zeros), in C++ on the kernels' thread pool
(lutlm.kernels.cpu.set_num_threads): a 7B model's tensors decode in seconds rather than
minutes. Where the library is not built (not x86), it is that numpy function.
"""

from __future__ import annotations

import ctypes

import numpy as np

from lutlm.formats.ggml_quants import type_name
from lutlm.formats.gguf_packed import LAYOUTS, SUPER_TYPES, SUPER_WEIGHTS, GroupedCodes, _check_size, ggml_groups


_declared = False


def _library() -> ctypes.CDLL | None:
    global _declared
    from lutlm.kernels import cpu

    if not cpu.available():
        return None
    lib = cpu.library()
    if not hasattr(lib, "lutlm_ggml_super_dot"):  # a library built before ggml_decode.cpp had it
        return None
    if not _declared:
        p = ctypes.c_void_p
        lib.lutlm_ggml_groups.argtypes = [ctypes.c_int, p, ctypes.c_int64, ctypes.c_int64, p, p, p]
        lib.lutlm_ggml_groups.restype = ctypes.c_int
        lib.lutlm_ggml_super_dot.argtypes = [ctypes.c_int, p, ctypes.c_int64, ctypes.c_int64, p, p, p]
        lib.lutlm_ggml_super_dot.restype = ctypes.c_int
        lib.lutlm_float_to_half.argtypes = [p, ctypes.c_int64, p]
        lib.lutlm_float_to_half.restype = None
        _declared = True
    return lib


def available() -> bool:
    return _library() is not None


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def ggml_groups_native(raw: np.ndarray, kind: str | int, shape: tuple[int, int]) -> GroupedCodes:
    """One [N, K] ggml tensor's raw blocks -> its groups, decoded in C++ (numpy where the
    library is not built). `kind` is a ggml type name, enum member or id."""
    from gguf import GGMLQuantizationType

    lib = _library()
    if lib is None:
        return ggml_groups(raw, kind, shape)
    kind = type_name(kind)
    raw, n, k = _check_size(raw, kind, shape)
    lay = LAYOUTS[kind]
    codes = np.empty((n, k), dtype=np.uint8)
    scales = np.empty((n, k // lay.group_size), dtype=np.float16)
    zeros = np.empty((n, k // lay.group_size), dtype=np.float16)
    rc = lib.lutlm_ggml_groups(int(GGMLQuantizationType[kind]), _ptr(raw), n, k, _ptr(codes), _ptr(scales),
                               _ptr(zeros))
    if rc == -2:
        raise ValueError("a block's scale or offset does not fit fp16")
    if rc < 0:
        raise ValueError(f"the native decoder refused a {kind} tensor of shape {(n, k)}")
    ternary = lay.ternary and rc == 0
    return GroupedCodes(codes, scales, zeros, lay.bits, lay.group_size, ternary)


def super_dot_layout(raw: np.ndarray, kind: str | int, shape: tuple[int, int], row_of: np.ndarray | None = None):
    """One [N, K] K-quant tensor's raw blocks straight into the CPU dot kernels' layout with its
    own two-level scales (a LutWeight), rows taken in the order `row_of` (output row -> source
    row) gives: decoded and laid out a tile at a time in C++ on the kernels' threads, the
    bytes lutlm.kernels.cpu.prepare_super_rows writes from gguf_packed.ggml_super's arrays."""
    import torch
    from gguf import GGMLQuantizationType

    from lutlm.kernels import cpu
    from lutlm.kernels.cpu_layout import STEP, TILE_ROWS, dot_shape

    kind = type_name(kind)
    if kind not in SUPER_TYPES:
        raise ValueError(f"ggml type {kind} has no two-level scales: those are {', '.join(SUPER_TYPES)}")
    lib = _library()
    if lib is None:
        raise RuntimeError("the lutlm CPU kernel library is not built")
    raw, n, k = _check_size(raw, kind, shape)
    lay = LAYOUTS[kind]
    layout = SUPER_TYPES[kind][0]
    tiles, per = -(-n // TILE_ROWS), SUPER_WEIGHTS // lay.group_size
    codes = torch.empty(tiles, k // STEP, lay.bits, TILE_ROWS, 4, dtype=torch.uint8)
    scales = torch.empty(tiles, k // SUPER_WEIGHTS, 64 + 16 * per * (2 if layout == "super" else 1), dtype=torch.uint8)
    if row_of is not None:
        row_of = np.ascontiguousarray(row_of, dtype=np.int64)
        if row_of.shape != (n,) or row_of.min(initial=0) < 0 or row_of.max(initial=0) >= n:
            raise ValueError(f"row_of must give a source row in [0, {n}) for each of the {n} rows")
    rc = lib.lutlm_ggml_super_dot(int(GGMLQuantizationType[kind]), _ptr(raw), n, k,
                                  None if row_of is None else _ptr(row_of), codes.data_ptr(), scales.data_ptr())
    if rc == -2:
        raise ValueError(f"a {kind} block's d times its zero does not fit fp16")
    if rc < 0:
        raise ValueError(f"the native decoder refused a {kind} tensor of shape {(n, k)}")
    blocking = dot_shape(lay.bits, lay.group_size, k)
    return cpu.laid_out(codes, scales, n, k, blocking.k_padded, lay.bits, blocking.group_size, blocking.q_block,
                        cpu.DOT_KIND, layout)


def float_to_half(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 with the decoder's own rounding (for its tests)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the lutlm CPU kernel library is not built")
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.float16)
    lib.lutlm_float_to_half(_ptr(x), x.size, _ptr(out))
    return out
