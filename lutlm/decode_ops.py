"""The decode step's element-wise helpers (runtime_csrc/decode_ops.cpp) through ctypes.

`library()` gives the raw C functions, for lutlm.fast_decode, which binds their pointer
arguments once and calls them every step. The tensor functions below check their inputs
and are the tested surface; lutlm.model's PyTorch operations are their reference.
"""

from __future__ import annotations

import ctypes

import torch

from lutlm.native import load_library

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def _load() -> ctypes.CDLL | None:
    lib = load_library("lutlm._lutlm_decode_ops")
    if lib is None:
        return None
    lib.lutlm_rmsnorm.argtypes = [_P, _P, _I64, _F32, _P]
    lib.lutlm_add_rmsnorm.argtypes = [_P, _P, _P, _I64, _F32, _P]
    lib.lutlm_silu_mul.argtypes = [_P, _P, _I64, _P]
    for fn in (lib.lutlm_attend_one, lib.lutlm_attend_one_f16):
        fn.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _P, _P]
    lib.lutlm_rmsnorm_rows.argtypes = [_P, _P, _I64, _I64, _F32, _P]
    lib.lutlm_add_rmsnorm_rows.argtypes = [_P, _P, _P, _I64, _I64, _F32, _P]
    for fn in (lib.lutlm_attend_rows, lib.lutlm_attend_rows_f16):
        fn.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _P, _P]
    for fn in (lib.lutlm_rmsnorm, lib.lutlm_add_rmsnorm, lib.lutlm_silu_mul, lib.lutlm_attend_one,
               lib.lutlm_attend_one_f16, lib.lutlm_rmsnorm_rows, lib.lutlm_add_rmsnorm_rows, lib.lutlm_attend_rows,
               lib.lutlm_attend_rows_f16):
        fn.restype = None
    return lib


_lib = _load()


def available() -> bool:
    return _lib is not None


def library() -> ctypes.CDLL:
    if _lib is None:
        raise RuntimeError(
            "lutlm's decode helpers are not built; reinstall lutlm with a C++ compiler (pip install -e .)"
        )
    return _lib


CACHE_DTYPES = (torch.float32, torch.float16)
MAX_HEAD_DIM = 256  # runtime_csrc/decode_ops.cpp's MAX_HEAD_DIM: its buffer of widened fp16 rows


def attend_function(cache_dtype: torch.dtype, rows: bool = False):
    """The C attention for a KV cache of `cache_dtype` (float32 or float16): of one token
    (lutlm_attend_one), or of one token per sequence over the slots of a KVCache (`rows`)."""
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"the decode attention takes a float32 or float16 KV cache, not {cache_dtype}")
    lib = library()
    if rows:
        return lib.lutlm_attend_rows if cache_dtype == torch.float32 else lib.lutlm_attend_rows_f16
    return lib.lutlm_attend_one if cache_dtype == torch.float32 else lib.lutlm_attend_one_f16


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {str(dtype).removeprefix('torch.')} CPU tensor, got {t.dtype} "
                         f"on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight for one vector x [n]."""
    (n,) = weight.shape
    _check("x", x, (n,))
    _check("weight", weight, (n,))
    out = torch.empty(n)
    library().lutlm_rmsnorm(x.data_ptr(), weight.data_ptr(), n, eps, out.data_ptr())
    return out


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta (in place, the residual stream), then rmsnorm(x) * weight."""
    (n,) = weight.shape
    for name, t in (("x", x), ("delta", delta), ("weight", weight)):
        _check(name, t, (n,))
    out = torch.empty(n)
    library().lutlm_add_rmsnorm(x.data_ptr(), delta.data_ptr(), weight.data_ptr(), n, eps, out.data_ptr())
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for vectors [n]."""
    (n,) = gate.shape
    _check("gate", gate, (n,))
    _check("up", up, (n,))
    out = torch.empty(n)
    library().lutlm_silu_mul(gate.data_ptr(), up.data_ptr(), n, out.data_ptr())
    return out


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> torch.Tensor:
    """Attention of one token at `pos`: q [H, D], k and v [Hkv, D], cos and sin [D], caches
    [Hkv, S, D], float32 or float16 both. Rotates q and k in place, writes k and v into the
    caches at `pos` (rounded to the caches' type), and returns the output [H, D] over
    positions 0..pos."""
    n_heads, head_dim = q.shape
    n_kv, max_seq, _ = k_cache.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"heads of {head_dim} values: the decode attention takes up to {MAX_HEAD_DIM}")
    if head_dim % 2 or n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads of size {head_dim} cannot attend over {n_kv} key/value heads")
    if not 0 <= pos < max_seq:
        raise ValueError(f"position {pos} is outside the cache of {max_seq} positions")
    attend = attend_function(k_cache.dtype)
    for name, t, shape in (("q", q, (n_heads, head_dim)), ("k", k, (n_kv, head_dim)), ("v", v, (n_kv, head_dim)),
                           ("cos", cos, (head_dim,)), ("sin", sin, (head_dim,))):
        _check(name, t, shape)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(name, t, (n_kv, max_seq, head_dim), k_cache.dtype)
    scores, out = torch.empty(n_heads // n_kv * (pos + 1)), torch.empty(n_heads, head_dim)
    attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
           k_cache.data_ptr(), v_cache.data_ptr(), n_heads, n_kv, head_dim, max_seq, pos, scores.data_ptr(),
           out.data_ptr())
    return out


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
    """attend_one for B sequences: q [B, H, D], k and v [B, Hkv, D], cos and sin tables
    [S, D], caches [slots, Hkv, S, D]; row b at positions[b] of slot slots[b]."""
    batch, n_heads, head_dim = q.shape
    n_slots, n_kv, max_seq, _ = k_cache.shape
    if len(slots) != batch or len(positions) != batch:
        raise ValueError(f"{batch} rows need one slot and one position each, got {slots} and {positions}")
    if any(not 0 <= s < n_slots for s in slots) or any(not 0 <= p < max_seq for p in positions):
        raise ValueError(f"slots {slots} at positions {positions} do not fit the cache of {n_slots} x {max_seq}")
    attend = attend_function(k_cache.dtype, rows=True)
    for name, t, shape in (("q", q, (batch, n_heads, head_dim)), ("k", k, (batch, n_kv, head_dim)),
                           ("v", v, (batch, n_kv, head_dim)), ("cos", cos, (max_seq, head_dim)),
                           ("sin", sin, (max_seq, head_dim))):
        _check(name, t, shape)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(name, t, (n_slots, n_kv, max_seq, head_dim), k_cache.dtype)
    index = torch.tensor([slots, positions], dtype=torch.int64)
    scores, out = torch.empty(n_heads // n_kv * max_seq), torch.empty(batch, n_heads, head_dim)
    attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
           v_cache.data_ptr(), n_kv * max_seq * head_dim, index[0].data_ptr(), index[1].data_ptr(), batch, n_heads,
           n_kv, head_dim, max_seq, scores.data_ptr(), out.data_ptr())
    return out
