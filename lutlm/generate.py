"""Text generation: sampling, stop conditions, streaming, prompt-prefix reuse, timing."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from lutlm.fast_decode import fast_decoder_for
from lutlm.gpu_decode import gpu_decoder_for
from lutlm.kv_cache import KVCache
from lutlm.model import Transformer, model_device
from lutlm.tokenizer import Tokenizer

# The KV cache of generation: float16 whatever the model's type, as llama.cpp keeps it (half
# the memory, and half of what each decode step reads at long contexts). Scoring (perplexity)
# keeps the model's own type.
GENERATION_CACHE_DTYPE = torch.float16


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 means none; Hugging Face's rule (divide positive logits)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # run to max_new_tokens through end tokens (fixed lengths, for benchmarks)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")


def sample_next(logits: torch.Tensor, params: SamplingParams, history: list[int], rng: torch.Generator | None) -> int:
    """Pick the next token from 1-D logits."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (the token that crosses it included).
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=rng))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually run (the rest came from the KV cache)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (end token or stop string) or "length"

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first new token comes out of the prefill; decode steps make the rest.
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if self.decode_seconds and steps > 0 else 0.0


class TextStream:
    """Token ids in, text out as it becomes final: no partial UTF-8 character and nothing that
    might still turn into a stop string is emitted early; text from a stop string on never is."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already given out
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that `token` makes final ("" if none); sets `stopped` at a stop string."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is still incomplete
        hits = [i for i in (text.find(s, max(0, self.emitted - self.longest_stop)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(text, min(hits))
        safe = len(text)
        for s in self.stop:  # hold back a tail that could begin a stop string
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    safe = min(safe, len(text) - n)
                    break
        return self._emit(text, safe)

    def finish(self) -> str:
        """What is held back, once no token will follow (nothing after a stop string)."""
        return "" if self.stopped else self._emit(self.tokenizer.decode(self.ids), None)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        if end <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:end], end
        return piece


class Generator:
    """Generates for one sequence at a time over a KV cache of its own, which it keeps between
    calls so that a prompt extending the last one (a chat's next turn) only prefills what is new."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length or min(model.config.max_position_embeddings, 4096)
        self.eos_ids = set(model.config.eos_token_ids)
        if tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)
        # Token ids go where the model runs, which its rotary table shows (CPU for stand-ins without one).
        self.device = model_device(model)
        self.cache: KVCache | None = None  # allocated by the first call
        self._cached: list[int] = []  # tokens whose keys and values sit in the cache
        # One-token steps without PyTorch's per-operation overhead, where supported.
        self.fast_decoder = fast_decoder_for(model) or gpu_decoder_for(model)
        self.stats = GenerationStats()

    def _run(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        if len(tokens) == 1 and self.fast_decoder is not None:
            logits = self.fast_decoder(tokens[0], start_pos, self.cache)
        else:
            x = torch.tensor([tokens], dtype=torch.long, device=self.device)
            logits = self.model(x, start_pos, last_logits_only=True, cache=self.cache)[0, -1]
        self._cached = self._cached[:start_pos] + tokens
        return logits

    @torch.inference_mode()
    def generate_ids(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + params.max_new_tokens > self.context_length:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"context length {self.context_length}"
            )
        if self.cache is None:
            self.cache = KVCache(self.model.config, 1, self.context_length, GENERATION_CACHE_DTYPE, self.device)
        rng = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        reuse = 0
        while reuse < min(len(self._cached), len(prompt) - 1) and self._cached[reuse] == prompt[reuse]:
            reuse += 1
        self.stats = GenerationStats(prompt_tokens=len(prompt), prefilled_tokens=len(prompt) - reuse)
        if params.max_new_tokens == 0:
            self.stats.finish_reason = "length"
            return
        start = time.perf_counter()
        logits = self._run(prompt[reuse:], reuse)
        self.stats.prefill_seconds = time.perf_counter() - start
        history = list(prompt)
        start = time.perf_counter()
        while True:
            token = sample_next(logits, params, history, rng)
            history.append(token)
            self.stats.generated_tokens += 1
            if token in self.eos_ids and not params.ignore_eos:
                self.stats.finish_reason = "stop"
                break
            yield token
            if self.stats.generated_tokens >= params.max_new_tokens:
                self.stats.finish_reason = "length"
                break
            logits = self._run([token], len(history) - 1)
            self.stats.decode_seconds = time.perf_counter() - start
        self.stats.decode_seconds = time.perf_counter() - start

    def stream_text(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield text pieces as they become final (TextStream's rules)."""
        text = TextStream(self.tokenizer, params.stop)
        for token in self.generate_ids(prompt, params):
            if piece := text.add(token):
                yield piece
            if text.stopped:
                self.stats.finish_reason = "stop"
                return
        if piece := text.finish():
            yield piece

    def complete(self, prompt: list[int], params: SamplingParams) -> str:
        return "".join(self.stream_text(prompt, params))
