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
