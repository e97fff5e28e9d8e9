"""Fixtures shared across the suite: the bundled real model, loaded once, and the held-out text."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # The GPU kernels' tests then run through Triton's interpreter, which Triton only honours
    # if it is set before its first import (transformers imports Triton too).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lutlm.perplexity import DEFAULT_TEXT  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The fast tier's markers (pyproject.toml registers them; `make test-fast` deselects them), applied
# here by module and fixture so that a new test in these modules or on these fixtures is marked too.
INTERPRETER_MODULES = {"test_kernels_gpu.py", "test_gpu_decode.py"}
PEER_FIXTURES = {"llama_cpp_model", "llama_cpp_f32"}
# Tests that open llama.cpp themselves, through open_llama_cpp or the peer's quantizer.
PEER_TESTS = {
    "test_e2e.py::test_synthetic_gguf_is_quantized_and_timed_by_llama_cpp",
    "test_gguf_packed.py::test_q4_k_m_file_packs_its_q4_k_linears",
    "test_ggml_groups.py::test_llama_cpp_runs_the_tiny_files_as_lutlm_reads_them",
}
REAL_MODEL_FIXTURES = {"bundled_path", "bundled", "wikitext_path"}
# Over 5 s each on 2 cores without the real model (pytest --durations), for other reasons.
SLOW_TESTS = {
    "test_bench_gguf.py::test_bench_gguf_rows_report_and_files",  # 12 s: the whole GGUF bench on tiny files
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = os.path.basename(item.path)
        name = getattr(item, "originalname", item.name)
        test = f"{module}::{name}"
        fixtures = set(getattr(item, "fixturenames", ()))
        if module in INTERPRETER_MODULES:
            item.add_marker(pytest.mark.interpreter)
        if fixtures & PEER_FIXTURES or test in PEER_TESTS:
            item.add_marker(pytest.mark.peer)
        # A test named for the bundled model loads it, through these fixtures or on its own.
        if fixtures & REAL_MODEL_FIXTURES or "bundled" in name:
            item.add_marker(pytest.mark.real_model)
        if test in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def bundled_path() -> str:
    from lutlm.formats.gguf import bundled_model_path

    return bundled_model_path()


@pytest.fixture(scope="session")
def bundled(bundled_path):
    """(model, tokenizer, checkpoint) of the bundled SmolLM2-135M-Instruct, dense float32 (the
    reference path: its linears dequantized from the file's blocks)."""
    from lutlm.loader import load_model

    return load_model(bundled_path, backend="reference")


@pytest.fixture(scope="session")
def wikitext_path() -> str:
    path = os.path.join(REPO_ROOT, DEFAULT_TEXT)
    if not os.path.exists(path):
        pytest.skip(f"held-out text {path} is not present")
    return path


def open_llama_cpp(path: str):
    """llama.cpp on a GGUF; the calling test is skipped when the peer is not installed."""
    from lutlm import peer

    if not peer.available():
        pytest.skip("llama-cpp-python (the peer) is not installed: pip install -e '.[peer]'")
    return peer.LlamaCpp(path, n_ctx=512, n_threads=2)


@pytest.fixture(scope="session")
def llama_cpp_model(bundled_path):
    """llama.cpp on the bundled GGUF."""
    return open_llama_cpp(bundled_path)


def restore_cpu_kernel_defaults() -> None:
    """The CPU kernels' settings as the library starts: tests that move them call this after."""
    import torch

    from lutlm.kernels import cpu

    cpu.set_isa(cpu.best_isa())
    cpu.set_num_threads(torch.get_num_threads())
    cpu.set_parallel_threshold(8e6)
    cpu.set_dot_gemm_min_tokens(4)
