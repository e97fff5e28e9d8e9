"""CPU backend: table-lookup mpGEMM kernels (csrc/) through ctypes.

The library works on the memory of contiguous float32 CPU tensors and never sees a
PyTorch object, so it does not depend on PyTorch's C++ ABI. `prepare` permutes a packed
weight into the kernels' layout once; `matmul` picks GEMV or GEMM by the batch size inside
the library. Instruction set (AVX-512 VBMI+VNNI, AVX2, portable C) is chosen at run time.

Table modes of `matmul`:
    "int8"   int8 tables with one scale per table block (the fast path; its error against
             int8 activations per q-block: docs/kernels.md).
             Exception: 4-bit products of several tokens (set_dot_gemm_min_tokens) on an
             AVX-512 CPU with GFNI run as a dot product of int8 activations and the codes,
             recovered from the bit-planes in registers (csrc/dot_gemm_avx512.cpp): there a
             lookup costs as much as a multiply-add per token, and the unpacking is shared by
             the tokens. Its results are the dequantize baseline's (same int8 activations,
             same integer sums), with the baseline's error bound; uses_dot_gemm says when.
    "float"  float tables, exact up to fp32 rounding (portable C; for tests): greedy
             decoding then gives the reference path's tokens.
    "fast"   int8 tables, pairs of lookups merged by averaging adds (fast aggregation),
             where a vpavgb replaces one of two widening adds: a larger error for little
             speed (docs/kernels.md).

Kernel families (`prepare(..., kernel=...)`):
    "lut"    table lookup (above): 1 to 4 bits, groups that are multiples of 32 or whole rows.
    "dot"    int8 dot products of the unpacked codes (csrc/dequant*.cpp, llama.cpp's method,
             with its own DOT layout): 1 to 8 bits, also groups of 16, on AVX-512 VNNI, AVX2
             and portable C. Modes "int8" and "fast" both round the activations to int8 per
             q-block (the dequantize baseline's error bound); "float" is exact up to fp32
             rounding. `prepare_codes` lays it out from one code per byte, in native code;
             `prepare_super_rows` a K-quant with its own two-level scales (csrc/lutlm.h).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from lutlm.formats.packed import PackedWeight, pack_planes
from lutlm.native import load_library
from lutlm.kernels.cpu_layout import (STEP, TERNARY_STEP, TILE_ROWS, dot_shape, kernel_shape, lut_codes, lut_shape,
                                      tile_scales)

MODES = {"int8": 0, "float": 1, "fast": 2}
# lutlm_scale_kind (csrc/lutlm.h): fp16 s and z per group, or the K-quants' two-level scales.
SCALE_KINDS = {"f16": 0, "super": 1, "symmetric": 2, "nibble": 3}
ISAS = ("scalar", "avx2", "avx512")
KERNELS = ("lut", "dot")
_PLANES, _TERNARY, _DOT = 0, 1, 2
DOT_KIND = _DOT  # lutlm_kind of the dot kernels' layout (for layouts made elsewhere: ggml_native)


class _Weight(ctypes.Structure):
    """Mirror of lutlm_weight in csrc/lutlm.h."""

    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("k_padded", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("group_size", ctypes.c_int32),
        ("q_block", ctypes.c_int32),
        ("kind", ctypes.c_int32),
        ("scale_kind", ctypes.c_int32),
        ("super_groups", ctypes.c_int32),
    ]


def _load() -> ctypes.CDLL | None:
    lib = load_library("lutlm.kernels._lutlm_cpu")
    if lib is None:
        return None
    weight_p, f32_p = ctypes.POINTER(_Weight), ctypes.c_void_p
    lib.lutlm_lut_matmul.argtypes = [weight_p, f32_p, ctypes.c_int64, f32_p, ctypes.c_int]
    lib.lutlm_dequant_matmul.argtypes = [weight_p, f32_p, ctypes.c_int64, f32_p]
    lib.lutlm_weight_layout.argtypes = [ctypes.c_void_p]
    lib.lutlm_weight_layout.restype = ctypes.c_int64
    lib.lutlm_read_bandwidth.argtypes = [ctypes.c_int64, ctypes.c_int]
    lib.lutlm_read_bandwidth.restype = ctypes.c_double
    lib.lutlm_set_num_threads.argtypes = [ctypes.c_int]
    lib.lutlm_set_isa.argtypes = [ctypes.c_int]
    lib.lutlm_set_parallel_threshold.argtypes = [ctypes.c_double]
    lib.lutlm_set_dot_gemm_min_tokens.argtypes = [ctypes.c_int64]
    lib.lutlm_dot_gemm_applies.argtypes = [weight_p, ctypes.c_int64]
    i64_p, i32_p = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int32)
    lib.lutlm_dot_shape.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, i64_p, i32_p,
                                    i32_p, i64_p, i64_p]
    lib.lutlm_pack_lut.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int32, ctypes.c_int64] + \
        [ctypes.c_void_p] * 2
    lib.lutlm_pack_dot.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
    lib.lutlm_set_num_threads(torch.get_num_threads())
    return lib


_lib = _load()


def library() -> ctypes.CDLL:
    if _lib is None:
        raise RuntimeError(
            "the lutlm CPU kernel library is not built; reinstall lutlm with a C++ compiler "
            "(pip install -e .)"
        )
    return _lib


def available() -> bool:
    return _lib is not None


def set_num_threads(n: int) -> None:
    """Threads the kernels use (their own pool, separate from PyTorch's)."""
    if n < 1:
        raise ValueError(f"thread count must be at least 1, got {n}")
    library().lutlm_set_num_threads(n)


def get_num_threads() -> int:
    return library().lutlm_get_num_threads()


def set_parallel_threshold(work: float) -> None:
    """Products with fewer weight bits x tokens than `work` run on one thread (default 8e6:
    below that, waking the threads costs about as much as the product)."""
    library().lutlm_set_parallel_threshold(work)


def set_dot_gemm_min_tokens(tokens: int) -> None:
    """4-bit products of at least `tokens` tokens (default 4, at least 2) use the dot-product
    GEMM where the CPU has it (see the "int8" mode above)."""
    library().lutlm_set_dot_gemm_min_tokens(tokens)


def uses_dot_gemm(handle: "LutWeight", batch: int) -> bool:
    """Whether an "int8" product of `batch` tokens with `handle` runs as the dot-product GEMM."""
    return bool(library().lutlm_dot_gemm_applies(ctypes.byref(handle.c), batch))


def best_isa() -> str:
    return ISAS[library().lutlm_best_isa()]


def get_isa() -> str:
    return ISAS[library().lutlm_get_isa()]


def set_isa(name: str) -> str:
    """Use a lower instruction set than the best one (for tests); returns the one in effect."""
    if name not in ISAS:
        raise ValueError(f"unknown instruction set {name!r}; choose one of {', '.join(ISAS)}")
    return ISAS[library().lutlm_set_isa(ISAS.index(name))]


@dataclass
class LutWeight:
    """A packed weight in the kernel layout; holds the tensors the C struct points into."""

    codes: torch.Tensor
    scales: torch.Tensor
    c: _Weight
    in_features: int
    out_features: int
    bits: int
    q_block: int
    ternary_tables: bool
    kernel: str = "lut"  # the family: "lut" (table lookup) or "dot" (int8 dot products)
    scale_layout: str = "f16"  # SCALE_KINDS: "f16", or a K-quant's two-level scales (dot only)

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per product: codes and scales."""
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()


def describe_weight(codes: torch.Tensor, scales: torch.Tensor, w: PackedWeight, shape, kind: int) -> _Weight:
    """The C descriptor of a weight whose kernel-layout tensors are `codes` and `scales`."""
    return _Weight(
        codes.data_ptr(), scales.data_ptr(), w.out_features, w.in_features, shape.k_padded, w.bits,
        shape.group_size, shape.q_block, kind, 0, 0,
    )


def supports(bits: int, group_size: int, in_features: int, kernel: str | None = None) -> bool:
    """Whether the kernel family `kernel` ("lut", "dot"; None: either) runs `bits`-bit weights
    with groups of `group_size` over `in_features` inputs."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"unknown kernel family {kernel!r}; choose one of {', '.join(KERNELS)}")
    for family in [kernel] if kernel else KERNELS:
        try:
            (lut_shape if family == "lut" else dot_shape)(bits, group_size, in_features)
            return True
        except ValueError:
            pass
    return False


def prepare(w: PackedWeight, ternary_tables: bool | None = None, kernel: str | None = None) -> LutWeight:
    """Lay `w` out for a kernel family: "lut" (table lookup), "dot" (int8 dot products), or
    None: table lookup where it runs the weight (1 to 4 bits, groups that are multiples of 32
    or whole rows), else the dot kernels (5 to 8 bits, groups of 16).

    Table lookup: ternary weights use the direct ternary table (3 weights per lookup, 1.67
    bits per weight) where their group size allows it, unless `ternary_tables` says
    otherwise; everything else uses bit-planes."""
    if kernel is None:
        kernel = next((f for f in KERNELS if supports(w.bits, w.group_size, w.in_features, f)), None)
        if kernel is None:
            raise ValueError(f"group size {w.group_size} is not supported by the CPU kernels: the table-lookup kernels "
                             f"take a multiple of 32 or one group per row (group size = in_features = "
                             f"{w.in_features}), the dot kernels also 16")
    elif kernel not in KERNELS:
        raise ValueError(f"unknown kernel family {kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "dot":
        if ternary_tables:
            raise ValueError("the ternary table layout is a table-lookup layout, not the dot kernels'")
        return prepare_codes(w.codes(), w.scales, w.zeros, w.bits, w.group_size, kernel="dot", ternary=w.ternary)
    if ternary_tables is None:
        ternary_tables = w.ternary and (w.group_size == w.in_features or w.group_size % 96 == 0)
    shape = kernel_shape(w, ternary_tables)
    codes, scales = lut_codes(w, shape), tile_scales(w, shape)
    c = describe_weight(codes, scales, w, shape, _TERNARY if ternary_tables else _PLANES)
    return LutWeight(codes, scales, c, w.in_features, w.out_features, w.bits, shape.q_block, ternary_tables)


def prepare_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                  kernel: str = "dot", ternary: bool = False) -> LutWeight:
    """Lay out a weight given as codes uint8 [N, K] (one code per byte, values < 2^bits) and
    fp16 scales and zeros [N, K // group_size] (w = s (q - z)), with no bit-planes, in native
    code on the kernels' threads (csrc/dot_pack.cpp, csrc/layout.cpp): the same bytes as
    `prepare` of the equivalent PackedWeight. `ternary` (codes t + 1, zeros 1): the table-lookup
    kernels' direct ternary table where the group allows it (a multiple of 96 or the whole row),
    as `prepare` picks it; bit-planes otherwise (TQ1_0/TQ2_0's groups of 256)."""
    if codes.dim() != 2 or codes.dtype != torch.uint8 or codes.device.type != "cpu":
        raise ValueError(f"codes must be a uint8 [N, K] CPU tensor, got {codes.dtype} {tuple(codes.shape)} "
                         f"on {codes.device}")
    n, k = codes.shape
    return prepare_code_rows(n, k, bits, group_size, [(codes, scales, zeros)], kernel, ternary)


def prepare_code_rows(n: int, k: int, bits: int, group_size: int, row_chunks, kernel: str = "dot",
                      ternary: bool = False) -> LutWeight:
    """`prepare_codes` of an N x K weight handed over in consecutive row chunks: `row_chunks`
    yields (codes [r, K], scales [r, G], zeros [r, G]) with r a multiple of 16 but in the last
    chunk. Both layouts store whole tiles of 16 rows one after another, so each chunk is laid
    out into its own slice of the result, and only one chunk's codes need exist at a time (a
    7B model's 49152 x 4096 head: 8 MiB at a time, not 200)."""
    if kernel not in KERNELS:
        raise ValueError(f"prepare_codes lays out the dot kernels' weights (kernel='dot') or the table-lookup "
                         f"kernels' (kernel='lut'), not {kernel!r}")
    if kernel == "lut" and ternary and (group_size == k or group_size % TERNARY_STEP == 0):
        # The direct ternary table (1.67 bits a weight), as `prepare` picks it: written from planes.
        codes, scales, zeros = (torch.cat(parts) for parts in zip(*row_chunks))
        return prepare(PackedWeight(pack_planes(codes, bits), scales, zeros, bits, group_size, True), kernel="lut")
    # a ValueError naming the problem
    shape = dot_shape(bits, group_size, k) if kernel == "dot" else lut_shape(bits, group_size, k, ternary)
    groups = 1 if group_size == k else k // group_size
    lib = library()
    tiles, steps, scale_groups = -(-n // TILE_ROWS), shape.k_padded // STEP, shape.k_padded // shape.group_size
    out_codes = torch.empty(tiles, steps, bits, TILE_ROWS, 4, dtype=torch.uint8)
    out_scales = torch.empty(tiles, scale_groups, 2, TILE_ROWS, dtype=torch.float16)
    row = 0
    for codes, scales, zeros in row_chunks:
        rows = codes.shape[0] if codes.dim() == 2 else -1
        if codes.dtype != torch.uint8 or codes.device.type != "cpu" or tuple(codes.shape) != (rows, k):
            raise ValueError(f"codes must be a uint8 [rows, {k}] CPU tensor, got {codes.dtype} "
                             f"{tuple(codes.shape)} on {codes.device}")
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (rows, groups) or t.dtype != torch.float16 or t.device.type != "cpu":
                raise ValueError(f"{name} must be a float16 [{rows}, {groups}] CPU tensor, got {t.dtype} "
                                 f"{tuple(t.shape)} on {t.device}")
        if row % TILE_ROWS or row + rows > n:
            raise ValueError(f"row chunks must cover the {n} rows in runs of whole 16-row tiles")
        codes, scales, zeros = codes.contiguous(), scales.contiguous(), zeros.contiguous()
        dst_codes, dst_scales = out_codes[row // TILE_ROWS:], out_scales[row // TILE_ROWS:]
        if kernel == "dot":
            rc = lib.lutlm_pack_dot(codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(), rows, k, bits, group_size,
                                    dst_codes.data_ptr(), dst_scales.data_ptr())
        else:
            rc = -2 if int(codes.max()) >= 1 << bits else lib.lutlm_pack_lut(
                codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(), rows, k, shape.k_padded, bits, groups,
                dst_codes.data_ptr(), dst_scales.data_ptr())
        if rc == -2:
            raise ValueError(f"a code is {int(codes.max())}, too large for {bits} bits")
        if rc:
            raise RuntimeError(f"the {kernel} layout converter rejected the call")
        row += rows
    if row != n:
        raise ValueError(f"row chunks gave {row} of the weight's {n} rows")
    return laid_out(out_codes, out_scales, n, k, shape.k_padded, bits, shape.group_size, shape.q_block,
                    _DOT if kernel == "dot" else _PLANES)


def prepare_super_rows(n: int, k: int, bits: int, group_size: int, scale_layout: str, row_chunks) -> LutWeight:
    """The dot kernels' layout of an N x K K-quant weight with its own two-level scales
    (csrc/lutlm.h, "Super-block scales"): `row_chunks` yields (codes uint8 [r, K], d and dmin
    float16 [r, K // 256], sc int8 [r, G], m int8 [r, G] or None for the symmetric layout), r a
    multiple of 16 but in the last chunk, as lutlm.formats.gguf_packed.SuperCodes holds them.
    The kernels read about the file's bytes: Q2_K 2.625 bits per weight, against 4 with an
    fp16 scale and zero per group of 16."""
    if scale_layout not in SCALE_KINDS or scale_layout == "f16":
        raise ValueError(f"unknown two-level scale layout {scale_layout!r}; choose super, symmetric or nibble")
    if group_size not in (16, 32) or k % 256:
        raise ValueError(f"two-level scales take groups of 16 or 32 in rows of whole 256-weight blocks, "
                         f"got group {group_size} and K = {k}")
    shape = dot_shape(bits, group_size, k)
    per, n_super, tiles = 256 // group_size, k // 256, -(-n // TILE_ROWS)
    super_bytes = 64 + 16 * per * (2 if scale_layout == "super" else 1)
    out_codes = torch.empty(tiles, k // STEP, bits, TILE_ROWS, 4, dtype=torch.uint8)
    out_scales = torch.empty(tiles, n_super, super_bytes, dtype=torch.uint8)
    lib = library()
    row = 0
    for codes, d, dmin, sc, m in row_chunks:
        rows = codes.shape[0]
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (rows, k):
            raise ValueError(f"codes must be a uint8 [rows, {k}] CPU tensor, got {codes.dtype} {tuple(codes.shape)}")
        if (m is None) != (scale_layout == "symmetric"):
            raise ValueError(f"the {scale_layout} layout {'needs' if m is None else 'takes no'} m")
        if row % TILE_ROWS or row + rows > n:
            raise ValueError(f"row chunks must cover the {n} rows in runs of whole 16-row tiles")
        t0, t1 = row // TILE_ROWS, -(-(row + rows) // TILE_ROWS)
        codes = codes.contiguous()
        if lib.lutlm_pack_dot(codes.data_ptr(), None, None, rows, k, bits, group_size, out_codes[t0:].data_ptr(),
                              None) == -2:
            raise ValueError(f"a code is {int(codes.max())}, too large for {bits} bits")
        out_scales[t0:t1] = _super_scale_tiles(d, dmin, sc, m, scale_layout, t1 - t0)
        row += rows
    if row != n:
        raise ValueError(f"row chunks gave {row} of the weight's {n} rows")
    return laid_out(out_codes, out_scales, n, k, shape.k_padded, bits, shape.group_size, shape.q_block, _DOT,
                    scale_layout)


def _super_scale_tiles(d, dmin, sc, m, scale_layout: str, tiles: int) -> torch.Tensor:
    """Rows' two-level scales -> [tiles, super-blocks, super_bytes] uint8 (padded rows 0)."""
    rows, n_super = d.shape
    per = sc.shape[1] // n_super

    def by_tile(a: torch.Tensor, width: int) -> torch.Tensor:  # [rows, n_super, width] -> [tiles, n_super, 16 width]
        padded = torch.zeros(tiles * TILE_ROWS, n_super, width, dtype=a.dtype)
        padded[:rows] = a.reshape(rows, n_super, width)
        return padded.view(tiles, TILE_ROWS, n_super, width).permute(0, 2, 3, 1).reshape(tiles, n_super, -1)

    head = torch.stack([torch.as_tensor(d), torch.as_tensor(dmin)], -1)  # [rows, n_super, 2]: d block, dmin block
    parts = [by_tile(head.view(torch.int16), 2).view(torch.uint8)]
    sc = torch.as_tensor(sc).view(torch.uint8)
    if scale_layout == "nibble":
        parts.append(by_tile((sc & 15) | (torch.as_tensor(m).view(torch.uint8) << 4), per))
    else:
        parts.append(by_tile(sc, per))
        if scale_layout == "super":
            parts.append(by_tile(torch.as_tensor(m).view(torch.uint8), per))
    return torch.cat(parts, -1)


def laid_out(codes: torch.Tensor, scales: torch.Tensor, n: int, k: int, k_padded: int, bits: int, group_size: int,
             q_block: int, kind: int, scale_layout: str = "f16") -> LutWeight:
    """The handle of a weight already in a kernel layout (`kind`: the lutlm_kind of lutlm.h;
    `scale_layout`: its scales'), whose tensors it keeps alive: one made here, or one mapped
    from a layout cache."""
    super_groups = 0 if scale_layout == "f16" else 256 // group_size
    c = _Weight(codes.data_ptr(), scales.data_ptr(), n, k, k_padded, bits, group_size, q_block, kind,
                SCALE_KINDS[scale_layout], super_groups)
    return LutWeight(codes, scales, c, k, n, bits, q_block, kind == _TERNARY, kernel="dot" if kind == _DOT else "lut",
                     scale_layout=scale_layout)


def as_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [..., K] -> contiguous float32 [batch, K] on the CPU, or a clear error."""
    if not x.is_floating_point():
        raise TypeError(f"activations must be a floating-point tensor, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"the CPU kernels need activations on the CPU, got a tensor on {x.device}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"activations have shape {tuple(x.shape)}: the last dimension must be {in_features}")
    return x.reshape(-1, in_features).to(torch.float32).contiguous()


def matmul(x: torch.Tensor, handle: LutWeight, mode: str = "int8") -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T, float32."""
    if mode not in MODES:
        raise ValueError(f"unknown table mode {mode!r}; choose one of {', '.join(MODES)}")
    rows = as_rows(x, handle.in_features)
    y = torch.empty(rows.shape[0], handle.out_features, dtype=torch.float32)
    rc = library().lutlm_lut_matmul(ctypes.byref(handle.c), rows.data_ptr(), rows.shape[0], y.data_ptr(), MODES[mode])
    if rc != 0:
        raise RuntimeError(f"lutlm_lut_matmul rejected the call (mode {mode!r} on {get_isa()})")
    return y.view(*x.shape[:-1], handle.out_features)


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Best-of-`repeats` memory read bandwidth in bytes/s with the kernels' threads."""
    return library().lutlm_read_bandwidth(nbytes, repeats)
