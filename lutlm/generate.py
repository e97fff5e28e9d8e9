"""Text generation: sampling, stop conditions, streaming, prompt-prefix reuse, timing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from lutlm.fast_decode import fast_decoder_for
from lutlm.gpu_decode import gpu_decoder_for
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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


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


class Generator:
    """Generates for one sequence at a time, keeping the KV cache of the previous call so
    that a prompt extending it (a chat's next turn) only prefills what is new."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length or min(model.config.max_position_embeddings, 4096)
        self.eos_ids = set(model.config.eos_token_ids)
        if tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)
        # Token ids go where the model runs, which its rotary table shows (CPU for stand-ins without one).
        self.device = model_device(model)
        self._cached: list[int] = []  # tokens whose keys and values sit in the cache
        self._cache_allocation = model.cache_allocations  # ... as long as the cache is the same one
        # One-token steps without PyTorch's per-operation overhead, where supported.
        self.fast_decoder = fast_decoder_for(model) or gpu_decoder_for(model)
        self.stats = GenerationStats()

    def _run(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        if len(tokens) == 1 and self.fast_decoder is not None:
            logits = self.fast_decoder(tokens[0], start_pos)
        else:
            x = torch.tensor([tokens], dtype=torch.long, device=self.device)
            logits = self.model(x, start_pos, last_logits_only=True)[0, -1]
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
        self.model.setup_cache(1, self.context_length, dtype=GENERATION_CACHE_DTYPE)
        if self.model.cache_allocations != self._cache_allocation:  # replaced (here, or by another user)
            self._cached, self._cache_allocation = [], self.model.cache_allocations
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
            if token in self.eos_ids:
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
        """Yield text pieces as they become final: no partial UTF-8 character and nothing
        that might still turn into a stop string is emitted early."""
        ids: list[int] = []
        emitted = 0
        longest_stop = max((len(s) for s in params.stop), default=0)
        for token in self.generate_ids(prompt, params):
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):
                continue  # a multi-byte character is still incomplete
            hits = [i for i in (text.find(s, max(0, emitted - longest_stop)) for s in params.stop) if i >= 0]
            if hits:
                cut = min(hits)
                if cut > emitted:
                    yield text[emitted:cut]
                self.stats.finish_reason = "stop"
                return
            safe = len(text)
            for s in params.stop:  # hold back a tail that could begin a stop string
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        safe = min(safe, len(text) - n)
                        break
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text = self.tokenizer.decode(ids)
        if len(text) > emitted:
            yield text[emitted:]

    def complete(self, prompt: list[int], params: SamplingParams) -> str:
        return "".join(self.stream_text(prompt, params))
