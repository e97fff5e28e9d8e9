"""Builds lutlm's CPU kernel library (lutlm/kernels/csrc) on `pip install`.

One shared library, loaded with ctypes (no Python C API, no PyTorch ABI). It is built for
the baseline x86-64 instruction set; the AVX2 and AVX-512 files raise their own target
with `#pragma GCC target`, and the library picks one at run time from CPUID, so a wheel
built here runs on a CPU without AVX-512. Everything else is in pyproject.toml.
"""

import platform

from setuptools import Extension, setup

SOURCES = [
    "api.cpp",
    "driver.cpp",
    "threadpool.cpp",
    "kernels_scalar.cpp",
    "kernels_avx2.cpp",
    "kernels_avx512.cpp",
    "dequant.cpp",
    "dequant_scalar.cpp",
    "dequant_avx2.cpp",
    "dequant_avx512.cpp",
    "dot_gemm_avx512.cpp",
    "dot_pack.cpp",
    "membw.cpp",
    "ggml_decode.cpp",
    "layout.cpp",
]

x86 = platform.machine().lower() in ("x86_64", "amd64")

ext_modules = (
    [
        Extension(
            "lutlm.kernels._lutlm_cpu",
            sources=[f"lutlm/kernels/csrc/{name}" for name in SOURCES],
            depends=[f"lutlm/kernels/csrc/{h}" for h in ("lutlm.h", "internal.h", "epilogue_avx2.h", "epilogue_avx512.h")],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-Wall", "-Wextra"],
            extra_link_args=["-pthread"],
        )
    ]
    if x86
    else []
)
# The decode step's element-wise helpers (lutlm/runtime_csrc): portable C++, built everywhere.
ext_modules.append(
    Extension(
        "lutlm._lutlm_decode_ops",
        sources=["lutlm/runtime_csrc/decode_ops.cpp"],
        language="c++",
        # -Wno-psabi: the 64-byte vectors of its inline helpers never cross a call boundary.
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp-simd", "-Wall", "-Wextra",
                            "-Wno-psabi"],
    )
)

setup(ext_modules=ext_modules)
