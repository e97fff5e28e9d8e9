"""llama.cpp, through llama-cpp-python: the peer that tests and benchmarks set beside lutlm.

Optional (`pip install -e '.[peer]'`); everything here is only called where `available()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import time

import numpy as np
import torch


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def run_description(requested: bool) -> str:
    """What a benchmark report says of the peer: its version where it ran, else why it did not."""
    if not available():
        return "not run (llama-cpp-python not installed)"
    return f"llama-cpp-python {version()}" if requested else "not run (--no-peer)"


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp prints model loading logs from C; keep them off the terminal."""
    fd = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


class LlamaCpp:
    """A GGUF model evaluated by llama.cpp: logits for given tokens and timed generation."""

    def __init__(self, path: str, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = True):
        import llama_cpp

        with _quiet_stderr():
            self.llm = llama_cpp.Llama(
                model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),  # prompts up to n_ctx
                n_threads=n_threads, n_threads_batch=n_threads, logits_all=logits_all, verbose=False,
            )
        self.n_ctx = n_ctx

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Logits [len(tokens), vocab] for a sequence run from an empty cache."""
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[: len(tokens)], dtype=np.float32))

    # Timed helpers for benchmarks. They drive the llama.cpp context directly (batch decode
    # and llama.cpp's own greedy sampler, no Python per token beyond the call), so they
    # time the engine, not llama-cpp-python's bookkeeping; `logits` resets that bookkeeping.

    def set_threads(self, n_threads: int) -> None:
        """Threads for both single-token decode and batched prompt processing."""
        import llama_cpp

        llama_cpp.llama_set_n_threads(self.llm.ctx, n_threads, n_threads)

    def _decode(self, tokens, n_tokens: int) -> None:
        import llama_cpp

        status = llama_cpp.llama_decode(self.llm.ctx, llama_cpp.llama_batch_get_one(tokens, n_tokens))
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} on {n_tokens} tokens")

    def prefill_seconds(self, tokens: list[int]) -> float:
        """Wall time of one batched forward pass over `tokens` from an empty cache (the
        logits of the last token only, as generation needs)."""
        import llama_cpp

        if len(tokens) > self.llm.n_batch or len(tokens) >= self.n_ctx:
            raise ValueError(f"a prompt of {len(tokens)} tokens exceeds the batch ({self.llm.n_batch}) "
                             f"or context ({self.n_ctx}) of this llama.cpp instance")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)
        batch = (llama_cpp.llama_token * len(tokens))(*tokens)
        start = time.perf_counter()
        self._decode(batch, len(tokens))
        return time.perf_counter() - start

    def decode_seconds(self, n_tokens: int) -> float:
        """Wall time of `n_tokens` greedy steps continuing the last prefill: each step picks
        the argmax of the previous logits and runs that token."""
        import llama_cpp

        ctx = self.llm.ctx
        greedy = llama_cpp.llama_sampler_init_greedy()
        one = (llama_cpp.llama_token * 1)()
        try:
            start = time.perf_counter()
            for _ in range(n_tokens):
                one[0] = llama_cpp.llama_sampler_sample(greedy, ctx, -1)
                self._decode(one, 1)
            return time.perf_counter() - start
        finally:
            llama_cpp.llama_sampler_free(greedy)


# llama.cpp's file types (enum llama_ftype in llama.h) for the quantizations we compare with.
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18,
          "TQ1_0": 36, "TQ2_0": 37}


def quantize(src: str, dst: str, kind: str, n_threads: int = 0) -> None:
    """Quantize a GGUF file with llama.cpp's own quantizer (requantizing allowed)."""
    import llama_cpp

    if kind not in FTYPES:
        raise ValueError(f"unknown llama.cpp quantization {kind!r}; known: {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = n_threads
    params.allow_requantize = True
    with _quiet_stderr():
        status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind} (status {status})")
