"""`lutlm bench serve`: a bounded load test of the OpenAI-compatible server, over loopback only.

`concurrency` client threads send streamed chat completions (greedy, a fixed set of prompts)
until `requests` have been sent or `duration` seconds have passed, whichever comes first.
Each request is timed end to end and to its first content token; the report gives
requests/s, completion tokens/s and latency percentiles over the successful requests.
One warm-up request first keeps one-time costs (KV cache allocation) out of the figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
from tqdm import tqdm


PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What do bees make?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "What is two plus two?",
    "Describe a cat in five words.",
]


class RequestFailed(Exception):
    pass


@dataclass
class RequestTiming:
    latency: float  # seconds from sending the request to the end of the stream
    first_token: float  # seconds to the first chunk carrying text
    prompt_tokens: int
    completion_tokens: int


def timed_chat_request(base_url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> RequestTiming:
    parts = urlsplit(base_url)
    body = json.dumps({
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    })
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    start = time.perf_counter()
    first_token = None
    usage = None
    try:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RequestFailed(f"HTTP {response.status}")
        for line in response:
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RequestFailed(f"stream error: {chunk['error']['message']}")
            if first_token is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first_token = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    finally:
        connection.close()
    latency = time.perf_counter() - start
    if usage is None:
        raise RequestFailed("the stream ended without a usage chunk")
    return RequestTiming(latency, first_token if first_token is not None else latency,
                         usage["prompt_tokens"], usage["completion_tokens"])


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p90, p99 = np.percentile(values, [50, 90, 99]) if values else (float("nan"),) * 3
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": min(values, default=float("nan")), "max": max(values, default=float("nan"))}


@dataclass
class LoadReport:
    base_url: str
    model: str
    concurrency: int
    max_tokens: int
    request_limit: int
    time_limit: float
    server_threads: int | None = None  # torch threads of an in-process server; None for an external one
    timings: list[RequestTiming] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    elapsed: float = 0.0

    @property
    def requests_per_second(self) -> float:
        return len(self.timings) / self.elapsed if self.elapsed else 0.0

    @property
    def completion_tokens_per_second(self) -> float:
        return sum(t.completion_tokens for t in self.timings) / self.elapsed if self.elapsed else 0.0

    def to_dict(self) -> dict:
        return {
            "base_url": self.base_url, "model": self.model, "concurrency": self.concurrency,
            "max_tokens": self.max_tokens, "request_limit": self.request_limit, "time_limit_s": self.time_limit,
            "server_threads": self.server_threads, "requests_ok": len(self.timings),
            "requests_failed": sum(self.errors.values()), "errors": dict(self.errors),
            "elapsed_s": self.elapsed, "requests_per_second": self.requests_per_second,
            "completion_tokens_per_second": self.completion_tokens_per_second,
            "prompt_tokens": percentiles([t.prompt_tokens for t in self.timings]),
            "completion_tokens": percentiles([t.completion_tokens for t in self.timings]),
            "latency_s": percentiles([t.latency for t in self.timings]),
            "first_token_s": percentiles([t.first_token for t in self.timings]),
        }

    def format(self) -> str:
        d = self.to_dict()
        threads = f"in-process, {self.server_threads} torch threads" if self.server_threads else "external"

        def row(name: str, p: dict, unit: str) -> str:
            return (f"{name:<18} p50 {p['p50']:.3f}{unit}  p90 {p['p90']:.3f}{unit}  p99 {p['p99']:.3f}{unit}  "
                    f"(min {p['min']:.3f}, max {p['max']:.3f})")

        lines = [
            f"server:            {self.base_url} ({threads}), model {self.model}",
            f"clients:           {self.concurrency} concurrent, streamed chat completions, greedy, "
            f"max_tokens {self.max_tokens}",
            f"shapes:            prompt {d['prompt_tokens']['min']:.0f}..{d['prompt_tokens']['max']:.0f} tokens, "
            f"completion {d['completion_tokens']['min']:.0f}..{d['completion_tokens']['max']:.0f} tokens",
            f"requests:          {d['requests_ok']} ok, {d['requests_failed']} failed in {self.elapsed:.1f} s "
            f"(limits: {self.request_limit} requests, {self.time_limit:.0f} s)"
            + (f"; errors: {dict(self.errors)}" if self.errors else ""),
            f"throughput:        {self.requests_per_second:.2f} requests/s, "
            f"{self.completion_tokens_per_second:.1f} completion tokens/s",
            row("latency:", d["latency_s"], " s"),
            row("first token:", d["first_token_s"], " s"),
        ]
        return "\n".join(lines)


def served_model(base_url: str, timeout: float) -> str:
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", "/v1/models")
        response = connection.getresponse()
        if response.status != 200:
            raise RequestFailed(f"GET /v1/models answered HTTP {response.status}")
        return json.loads(response.read())["data"][0]["id"]
    finally:
        connection.close()


def run_load(base_url: str, model: str | None = None, requests: int = 32, duration: float = 120.0,
             concurrency: int = 4, max_tokens: int = 32, prompts: list[str] = PROMPTS, timeout: float = 300.0,
             server_threads: int | None = None) -> LoadReport:
    """Send at most `requests` requests within `duration` seconds from `concurrency` threads to the
    server at `base_url` (e.g. http://127.0.0.1:8080), asking for `model` (default: the one it serves)."""
    from lutlm.serve import is_loopback

    host = urlsplit(base_url).hostname or ""
    if not is_loopback(host):
        raise ValueError(f"{base_url}: the load test only targets loopback addresses (127.0.0.1, ::1, localhost)")
    if requests < 1 or concurrency < 1 or duration <= 0 or max_tokens < 1:
        raise ValueError(f"requests, concurrency and max_tokens must be >= 1 and duration > 0, got {requests}, "
                         f"{concurrency}, {max_tokens} and {duration}")
    model = model or served_model(base_url, timeout)
    timed_chat_request(base_url, model, prompts[0], max_tokens, timeout)  # warm-up, not counted
    report = LoadReport(base_url, model, concurrency, max_tokens, requests, duration, server_threads)
    lock = threading.Lock()
    issued = 0
    deadline = time.monotonic() + duration
    progress = tqdm(total=requests, desc="load test", unit="req", file=sys.stderr)

    def client() -> None:
        nonlocal issued
        while True:
            with lock:
                if issued >= requests or time.monotonic() >= deadline:
                    return
                index = issued
                issued += 1
            try:
                timing = timed_chat_request(base_url, model, prompts[index % len(prompts)], max_tokens, timeout)
            except (RequestFailed, OSError, ValueError) as e:
                with lock:
                    report.errors[str(e) if isinstance(e, RequestFailed) else type(e).__name__] += 1
            else:
                with lock:
                    report.timings.append(timing)
            progress.update(1)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"load-client-{i}") for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.elapsed = time.perf_counter() - start
    progress.close()
    return report


def cmd_bench_serve(args: argparse.Namespace) -> None:
    limits = dict(requests=args.requests, duration=args.duration, concurrency=args.concurrency,
                  max_tokens=args.max_tokens)
    if args.url:
        report = run_load(args.url.rstrip("/").removesuffix("/v1"), **limits)
    else:
        import torch

        from lutlm.cli import set_threads
        from lutlm.loader import load_model
        from lutlm.serve import create_app, serve_in_background

        set_threads(args.threads)
        model, tokenizer, checkpoint = load_model(args.model, backend=args.backend)
        app = create_app(model, tokenizer, checkpoint, context_length=args.ctx,
                         max_queue=max(16, args.concurrency), max_tokens=max(1024, args.max_tokens))
        with serve_in_background(app) as base_url:
            report = run_load(base_url, app.state.service.model_id, server_threads=torch.get_num_threads(),
                              **limits)
    print(report.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)


def add_parser(bench_subparsers) -> None:
    from lutlm.cli import add_model_args

    p = bench_subparsers.add_parser("serve", help="load test of the HTTP server: requests/s, latency percentiles")
    add_model_args(p)
    p.add_argument("--url", help="a running lutlm server on loopback (default: start one in this process)")
    p.add_argument("--requests", type=int, default=32, help="send at most this many requests")
    p.add_argument("--duration", type=float, default=120.0, help="stop sending after this many seconds")
    p.add_argument("--concurrency", type=int, default=4, help="client threads")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--ctx", type=int, default=2048, help="context length of the in-process server")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(func=cmd_bench_serve)
