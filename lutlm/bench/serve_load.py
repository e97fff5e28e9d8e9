"""`lutlm bench serve`: bounded load tests of the OpenAI-compatible server, over loopback only.

`concurrency` client threads send streamed chat completions (greedy, a fixed set of prompts)
until `requests` have been sent or `duration` seconds have passed, whichever comes first.
Each request is timed to its first content token (TTFT), between its content chunks
(inter-token latency) and end to end; the report gives requests/s, aggregate completion
tokens/s and latency percentiles over the successful requests, and counts the failures.
One warm-up request first keeps one-time costs out of the figures.

The server is `--url`, or a `lutlm serve` started in a process of its own. `--clients 1,4,8,16`
sweeps the client count against one server, each level bounded by `--duration`, and writes
JSON, markdown and a plot of throughput and inter-token latency against clients under
`--out-dir/--machine`.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
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
    token_gaps: list[float] = field(default_factory=list)  # seconds between chunks carrying text


def timed_chat_request(base_url: str, model: str, prompt: str, max_tokens: int, timeout: float,
                       fixed_length: bool = False) -> RequestTiming:
    """One streamed chat completion, timed; `fixed_length`: through end tokens to max_tokens
    (llama.cpp's ignore_eos, which lutlm's server also takes)."""
    parts = urlsplit(base_url)
    body = json.dumps({
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    } | ({"ignore_eos": True} if fixed_length else {}))
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    start = time.perf_counter()
    first_token = last_token = None
    gaps = []
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
            if any(c["delta"].get("content") for c in chunk["choices"]):
                now = time.perf_counter()
                if first_token is None:
                    first_token = now - start
                else:
                    gaps.append(now - last_token)
                last_token = now
            usage = chunk.get("usage") or usage
    finally:
        connection.close()
    latency = time.perf_counter() - start
    if usage is None:
        raise RequestFailed("the stream ended without a usage chunk")
    return RequestTiming(latency, first_token if first_token is not None else latency,
                         usage["prompt_tokens"], usage["completion_tokens"], gaps)


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
    server_threads: int | None = None  # kernel threads of an in-process server; None for an external one
    fixed_length: bool = False
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
            "inter_token_s": percentiles([gap for t in self.timings for gap in t.token_gaps]),
        }

    def format(self) -> str:
        d = self.to_dict()
        threads = f"in-process, {self.server_threads} threads" if self.server_threads else "external"

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
            row("inter-token:", d["inter_token_s"], " s"),
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
             server_threads: int | None = None, fixed_length: bool = False, warm_up: bool = True) -> LoadReport:
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
    if warm_up:
        timed_chat_request(base_url, model, prompts[0], max_tokens, timeout, fixed_length)  # not counted
    report = LoadReport(base_url, model, concurrency, max_tokens, requests, duration, server_threads, fixed_length)
    lock = threading.Lock()
    issued = 0
    deadline = time.monotonic() + duration
    progress = tqdm(total=requests, desc=f"{concurrency} clients", unit="req", file=sys.stderr, leave=False)

    def client() -> None:
        nonlocal issued
        while True:
            with lock:
                if issued >= requests or time.monotonic() >= deadline:
                    return
                index = issued
                issued += 1
            try:
                timing = timed_chat_request(base_url, model, prompts[index % len(prompts)], max_tokens, timeout,
                                            fixed_length)
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


def sweep_summary(reports: list[LoadReport]) -> dict:
    """Per client count: aggregate tokens/s, TTFT and inter-token p50/p99, errors; and the
    scaling over the single-client run where there is one."""
    rows = []
    for r in reports:
        d = r.to_dict()
        rows.append({"clients": r.concurrency, "requests_ok": d["requests_ok"], "requests_failed": d["requests_failed"],
                     "errors": d["errors"], "elapsed_s": r.elapsed, "tokens_per_second": r.completion_tokens_per_second,
                     "ttft_p50_s": d["first_token_s"]["p50"], "ttft_p99_s": d["first_token_s"]["p99"],
                     "itl_p50_s": d["inter_token_s"]["p50"], "itl_p99_s": d["inter_token_s"]["p99"]})
    single = next((row for row in rows if row["clients"] == 1), None)
    for row in rows:
        if single and single["tokens_per_second"]:
            row["throughput_vs_1_client"] = row["tokens_per_second"] / single["tokens_per_second"]
            row["itl_p99_vs_1_client_p50"] = row["itl_p99_s"] / single["itl_p50_s"]
    return {"rows": rows, "runs": [r.to_dict() for r in reports]}


def sweep_markdown(summary: dict, setup: str) -> str:
    lines = [f"# lutlm serve under load\n\n{setup}\n",
             "| clients | ok | failed | tokens/s | x 1 client | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | "
             "ITL p99 (ms) | ITL p99 / 1-client p50 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        ratio = f"{r['throughput_vs_1_client']:.2f}" if "throughput_vs_1_client" in r else "-"
        itl_ratio = f"{r['itl_p99_vs_1_client_p50']:.2f}" if "itl_p99_vs_1_client_p50" in r else "-"
        lines.append(f"| {r['clients']} | {r['requests_ok']} | {r['requests_failed']} | {r['tokens_per_second']:.1f} | "
                     f"{ratio} | {1e3 * r['ttft_p50_s']:.0f} | {1e3 * r['ttft_p99_s']:.0f} | "
                     f"{1e3 * r['itl_p50_s']:.1f} | {1e3 * r['itl_p99_s']:.1f} | {itl_ratio} |")
    return "\n".join(lines) + "\n"


def sweep_plot(summary: dict, path: Path, title: str) -> None:
    from lutlm.bench.plotting import pyplot

    plt = pyplot()
    rows = summary["rows"]
    clients = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(clients, [r["tokens_per_second"] for r in rows], marker="o")
    left.set(xlabel="concurrent streaming clients", ylabel="aggregate generated tokens/s", title="throughput")
    right.plot(clients, [1e3 * r["itl_p50_s"] for r in rows], marker="o", label="p50")
    right.plot(clients, [1e3 * r["itl_p99_s"] for r in rows], marker="o", label="p99")
    right.set(xlabel="concurrent streaming clients", ylabel="ms", title="inter-token latency")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(clients)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_clients(text: str) -> list[int]:
    try:
        clients = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--clients takes client counts separated by commas (e.g. 1,4,8,16), got {text!r}") from None
    if not clients or min(clients) < 1:
        raise ValueError(f"--clients must be counts >= 1, got {text!r}")
    return clients


@contextlib.contextmanager
def server_for(args: argparse.Namespace, parallel: int):
    """The base URL, model id and threads of the server under test: --url, or a `lutlm serve`
    started here in a process of its own (in this one, the clients' threads would take the
    interpreter lock from the server's engine)."""
    if args.url:
        yield args.url.rstrip("/").removesuffix("/v1"), None, None
        return
    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "lutlm.cli", "serve", "--port", str(port), "--parallel", str(parallel),
               "--ctx", str(args.ctx), "--max-queue", str(max(16, 2 * parallel)),
               "--max-tokens", str(max(1024, args.max_tokens))]
    for flag, value in (("-m", args.model), ("-t", args.threads), ("--backend", args.backend),
                        ("--layout-cache", args.layout_cache), ("--step-tokens", args.step_tokens)):
        if value is not None:
            command += [flag, str(value)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(server, base_url)
        yield base_url, None, args.threads
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def wait_for_server(server: subprocess.Popen, base_url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before answering")
        try:
            served_model(base_url, 5)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server at {base_url} did not answer within {timeout:.0f} s")


def cmd_bench_serve(args: argparse.Namespace) -> None:
    if args.clients:
        return cmd_sweep(args)
    limits = dict(requests=args.requests, duration=args.duration, concurrency=args.concurrency,
                  max_tokens=args.max_tokens, fixed_length=args.fixed_length)
    with server_for(args, args.parallel or args.concurrency) as (base_url, model_id, threads):
        report = run_load(base_url, model_id, server_threads=threads, **limits)
    print(report.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)


def cmd_sweep(args: argparse.Namespace) -> None:
    clients = parse_clients(args.clients)
    parallel = args.parallel or max(clients)
    reports = []
    load_before = os.getloadavg()[0]
    with server_for(args, parallel) as (base_url, model_id, threads):
        for i, n in enumerate(clients):
            reports.append(run_load(base_url, model_id, requests=10**6, duration=args.duration, concurrency=n,
                                    max_tokens=args.max_tokens, server_threads=threads,
                                    fixed_length=args.fixed_length, warm_up=i == 0))
            print(reports[-1].format() + "\n", file=sys.stderr)
    summary = sweep_summary(reports)
    summary["setup"] = {"model": reports[0].model, "parallel": parallel, "server_threads": threads,
                        "step_tokens": args.step_tokens, "load_average_before_after": [load_before, os.getloadavg()[0]],
                        "max_tokens": args.max_tokens, "fixed_length": args.fixed_length,
                        "duration_s_per_level": args.duration, "clients": clients}
    setup = (f"Model {reports[0].model}, server `--parallel {parallel}`, {threads or '?'} kernel threads, "
             f"streamed greedy chat completions of {args.max_tokens} tokens"
             f"{' (ignore_eos)' if args.fixed_length else ''}, each client count for {args.duration:.0f} s "
             f"(clients send back to back; in-flight requests finish). Loopback. The machine's load average "
             f"(all its processes) was {load_before:.1f} before and {os.getloadavg()[0]:.1f} after.\n\n"
             f"Command: `lutlm {' '.join(sys.argv[1:])}`")
    markdown = sweep_markdown(summary, setup)
    print(markdown)
    if args.no_write:
        return
    out = Path(args.out_dir) / args.machine
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"serve_{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    sweep_plot(summary, stem.with_suffix(".png"), f"lutlm serve, {reports[0].model}, --parallel {parallel}")
    print(f"wrote {stem}.json, .md and .png", file=sys.stderr)


def add_parser(bench_subparsers) -> None:
    from lutlm.arguments import add_model_args

    p = bench_subparsers.add_parser("serve", help="load test of the HTTP server: throughput, TTFT, inter-token latency")
    add_model_args(p)
    p.add_argument("--url", help="a running lutlm server on loopback (default: start `lutlm serve` here)")
    p.add_argument("--requests", type=int, default=32, help="send at most this many requests")
    p.add_argument("--duration", type=float, default=120.0, help="stop sending after this many seconds (per level)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads")
    p.add_argument("--clients", help="sweep these client counts (e.g. 1,4,8,16), each for --duration seconds, "
                                     "and write the results under --out-dir/--machine")
    p.add_argument("-np", "--parallel", type=int,
                   help="slots of the in-process server (default: the largest client count)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--step-tokens", type=int, help="the server's --step-tokens (default: its own)")
    p.add_argument("--fixed-length", action="store_true", help="every request runs to --max-tokens (ignore_eos)")
    p.add_argument("--ctx", type=int, default=2048, help="context length of each slot of the in-process server")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.add_argument("--out-dir", default="benchmarks/results", help="--clients: where results go")
    p.add_argument("--machine", default="local", help="--clients: results go in OUT_DIR/MACHINE/")
    p.add_argument("--name", default="smollm2", help="--clients: the results' name, serve_NAME.*")
    p.add_argument("--no-write", action="store_true", help="--clients: print the report only")
    p.set_defaults(func=cmd_bench_serve)
