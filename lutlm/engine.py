"""Continuous batching: one loop owns the model and runs many sequences together.

Each step runs one batch of rows through the model: the next token of every sequence that is
decoding and, up to `step_tokens` rows in all, the next chunk of the prompts that are still
prefilling (at least MIN_PREFILL tokens, so that they progress whatever the load; up to
IDLE_PREFILL while no sequence decodes, since no one waits then). A new request thus joins
between two steps without stalling the others for its whole prompt: while any sequence decodes,
a step costs at most about a batch of `step_tokens` rows. The linears read their weights once per step for all rows; each row
attends over its own slot of one KVCache (`slots` sequences of `context_length` positions,
allocated once). Finished and cancelled sequences leave at the start of the next step and
free their slot; requests beyond the free slots wait in a bounded queue.

Each sequence samples with its own parameters and random generator. On the CPU kernels
(lutlm.fast_decode, batch_invariant) a row's result does not depend on the rest of the batch
(each packed product runs on enough rows for its kernel to compute every row the same way), so a
request gives the same tokens alone or in any batch. The PyTorch path (models the fast path
cannot run: float or GPU weights) batches the same way, but PyTorch's float GEMM may round
a row differently with the batch size.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lutlm.fast_decode import FastDecoder, unsupported_reason
from lutlm.generate import GENERATION_CACHE_DTYPE, GenerationStats, SamplingParams, TextStream, sample_next
from lutlm.kv_cache import KVCache, kv_bytes
from lutlm.model import Transformer, model_device
from lutlm.tokenizer import Tokenizer

DEFAULT_STEP_TOKENS = 10  # rows per step: bounds a step's time, so the running requests' token gaps
MIN_PREFILL = 4  # prompt tokens per step however many sequences decode
IDLE_PREFILL = 128  # prompt tokens per step while none decodes


class QueueFull(Exception):
    """Every slot is busy and `max_queue` requests already wait."""


@dataclass
class Request:
    """One generation. `post(kind, value)` receives ("text", piece) as text becomes final, then
    ("done", GenerationStats) or ("error", exception); with `logprobs` (the number of most likely
    alternatives wanted, 0 for none), also ("token", TokenLogprob) for each token before its text.
    It is called on the engine's thread. Setting `cancelled` ends the generation at the next step."""

    prompt: list[int]
    params: SamplingParams
    post: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before sampling's adjustments) and
    the `top` most likely tokens' (id, log-probability), most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), pairs)


class Sequence:
    """A request's state while it holds a slot: its tokens, how many of them the cache holds."""

    def __init__(self, request: Request, slot: int, tokenizer: Tokenizer):
        self.request, self.slot = request, slot
        self.tokens = list(request.prompt)
        self.cached = 0  # tokens whose keys and values are in the slot
        seed = request.params.seed
        self.rng = torch.Generator().manual_seed(seed) if seed is not None else None
        self.text = TextStream(tokenizer, request.params.stop)
        self.stats = GenerationStats(prompt_tokens=len(request.prompt), prefilled_tokens=len(request.prompt))
        self.started = time.perf_counter()

    @property
    def prefilling(self) -> bool:
        return self.stats.generated_tokens == 0


class Engine:
    """`submit` requests from any thread; `start` runs the loop on a thread of its own."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, slots: int = 4, context_length: int = 2048,
                 max_queue: int = 16, step_tokens: int = DEFAULT_STEP_TOKENS):
        for name, value in (("slots", slots), ("max_queue", max_queue), ("step_tokens", step_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.model, self.tokenizer = model, tokenizer
        self.slots, self.context_length, self.max_queue = slots, context_length, max_queue
        self.step_tokens = step_tokens
        self.eos_ids = set(model.config.eos_token_ids) | ({tokenizer.eos_id} - {None})
        check_memory(model, slots, context_length)
        self.cache = KVCache(model.config, slots, context_length, GENERATION_CACHE_DTYPE, model_device(model))
        self.decoder = (FastDecoder(model, max_batch=slots + max(step_tokens, IDLE_PREFILL), batch_invariant=True)
                        if unsupported_reason(model) is None else None)
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: dict[int, Sequence] = {}  # slot -> its sequence
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Counters (for /health); only the engine thread writes them.
        self.completed = self.cancelled = self.failed = self.generated_tokens = self.steps = 0

    # ---- the interface, for any thread ----

    def submit(self, request: Request) -> None:
        if not request.prompt:
            raise ValueError("the prompt is empty")
        if request.params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.params.max_new_tokens}")
        if len(request.prompt) + request.params.max_new_tokens > self.context_length:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) plus max_new_tokens "
                             f"({request.params.max_new_tokens}) exceeds the context length {self.context_length}")
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{self.slots} requests are running and {self.max_queue} already wait")
            self.waiting.append(request)
            self._wake.notify()

    @property
    def running(self) -> int:
        return len(self.active)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lutlm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        with self._wake:
            self._stopping = True
            for request in self.waiting:
                request.cancelled.set()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the loop ----

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self.waiting or self.active or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
            self.step()
        for seq in list(self.active.values()):
            self._release(seq)

    def step(self) -> None:
        """Admit, run one batch, sample: what one turn of the loop does."""
        self._drop_cancelled()
        self._admit()
        if not self.active:
            return
        batch = self._plan()
        try:
            logits = self._forward(batch)
        except Exception as error:  # the engine outlives any one batch's failure
            for seq, _ in batch:
                self.failed += 1
                seq.request.post("error", error)
                self._release(seq)
            return
        self.steps += 1
        for (seq, taken), row in zip(batch, logits_rows(batch, logits)):
            seq.cached += taken
            if row is not None:
                self._advance(seq, row)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.active.values() if s.request.cancelled.is_set()]:
            self.cancelled += 1
            self.generated_tokens += seq.stats.generated_tokens
            self._release(seq)

    def _admit(self) -> None:
        with self._wake:
            free = [s for s in range(self.slots) if s not in self.active]
            while free and self.waiting:
                request = self.waiting.popleft()
                if request.cancelled.is_set():  # its client left while it waited
                    self.cancelled += 1
                    continue
                slot = free.pop(0)
                self.active[slot] = Sequence(request, slot, self.tokenizer)

    def _plan(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens it runs this step): one for each decoding sequence, then prompt
        chunks in the rows left, oldest request first."""
        decoding = [(seq, 1) for seq in self.active.values() if not seq.prefilling]
        budget = max(self.step_tokens - len(decoding), MIN_PREFILL) if decoding else max(self.step_tokens, IDLE_PREFILL)
        prefills = []
        for seq in sorted((s for s in self.active.values() if s.prefilling), key=lambda s: s.started):
            if budget == 0:
                break
            take = min(budget, len(seq.tokens) - seq.cached)
            prefills.append((seq, take))
            budget -= take
        return decoding + prefills

    def _forward(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Logits [rows wanted, vocab]: one per sequence whose last token runs this step."""
        if self.decoder is not None:
            tokens, positions, slots, wanted = [], [], [], []
            for seq, taken in batch:
                tokens += seq.tokens[seq.cached:seq.cached + taken]
                positions += range(seq.cached, seq.cached + taken)
                slots += [seq.slot] * taken
                if seq.cached + taken == len(seq.tokens):
                    wanted.append(len(tokens) - 1)
            return self.decoder.step(tokens, positions, self.cache, slots, wanted)
        # PyTorch: the one-token rows as one batch, each prompt chunk as a batch of its own.
        decoding = [seq for seq, taken in batch if not seq.prefilling]
        outputs = []
        with torch.inference_mode():
            if decoding:
                tokens = torch.tensor([[seq.tokens[-1]] for seq in decoding], device=self.cache.device)
                outputs.append(self.model(tokens, [seq.cached for seq in decoding], last_logits_only=True,
                                          cache=self.cache, slots=[seq.slot for seq in decoding])[:, -1])
            for seq, taken in batch[len(decoding):]:
                chunk = torch.tensor([seq.tokens[seq.cached:seq.cached + taken]], device=self.cache.device)
                out = self.model(chunk, seq.cached, last_logits_only=True, cache=self.cache, slots=[seq.slot])
                if seq.cached + taken == len(seq.tokens):
                    outputs.append(out[:, -1])
        return torch.cat(outputs).float().cpu() if outputs else torch.empty(0)

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample the sequence's next token, stream its text, and end it where it ends."""
        params, stats = seq.request.params, seq.stats
        raw = logits.clone() if seq.request.logprobs is not None else None  # sampling may change logits
        token = sample_next(logits, params, seq.tokens, seq.rng)
        stats.generated_tokens += 1
        if token in self.eos_ids and not params.ignore_eos:
            return self._finish(seq, "stop")
        seq.tokens.append(token)
        if raw is not None:
            seq.request.post("token", token_logprob(raw, token, seq.request.logprobs))
        if piece := seq.text.add(token):
            seq.request.post("text", piece)
        if seq.text.stopped:
            return self._finish(seq, "stop")
        if stats.generated_tokens >= params.max_new_tokens:
            return self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if piece := seq.text.finish():
            seq.request.post("text", piece)
        seq.stats.finish_reason = reason
        seq.stats.decode_seconds = time.perf_counter() - seq.started
        self.completed += 1
        self.generated_tokens += seq.stats.generated_tokens
        seq.request.post("done", seq.stats)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.active.pop(seq.slot, None)


def logits_rows(batch: list[tuple[Sequence, int]], logits: torch.Tensor) -> list[torch.Tensor | None]:
    """Each batch entry's logits row, or None for a prompt chunk that does not end its prompt."""
    rows, i = [], 0
    for seq, taken in batch:
        if seq.cached + taken == len(seq.tokens):
            rows.append(logits[i])
            i += 1
        else:
            rows.append(None)
    return rows


def check_memory(model: Transformer, slots: int, context_length: int) -> None:
    """A clear error, before allocating, where the KV cache cannot fit the memory available."""
    need = kv_bytes(model.config, slots, context_length, GENERATION_CACHE_DTYPE)
    available = available_memory()
    if available is not None and need > 0.9 * available:
        raise ValueError(f"a KV cache of {slots} slots x {context_length} positions needs {need / 2**30:.1f} GiB and "
                         f"{available / 2**30:.1f} GiB are available; lower the slots (--parallel) or --ctx")


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
