"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions, and /health
(queue state and counters).

A model instance holds one KV cache and is not thread-safe, so generation runs on a single
worker thread fed by a bounded wait queue; a request that finds the queue full gets 429.
Streamed answers are server-sent events (`data: {...}`, then `data: [DONE]`). A client that
disconnects cancels its generation between two tokens, which frees the worker at once.
Every refused request gets OpenAI's error shape:
``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, AsyncIterator, Iterator, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lutlm.formats import Checkpoint
from lutlm.generate import GenerationStats, Generator, SamplingParams
from lutlm.model import Transformer
from lutlm.tokenizer import Tokenizer

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """A refused request, answered with its HTTP status in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


# ---- request schemas -------------------------------------------------------------------------

class Schema(BaseModel):
    # Strict like OpenAI ("5" is not an integer); unknown fields (user, presence_penalty, ...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Schema):
    include_usage: bool = False


class SamplingFields(Schema):
    """Fields both endpoints share. top_k and repetition_penalty are extensions, as in llama.cpp's server."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    n: Literal[1] = 1  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | Annotated[list[str], Field(min_length=1, max_length=1)]


class TextPart(Schema):
    type: Literal["text"]
    text: str


class ChatMessage(Schema):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


def _param_path(loc: tuple) -> str:
    """'messages[0].role' from pydantic's location, without the tags it adds for union members."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool"):
            path += f".{part}" if path else part
    return path


def _validation_error(error: ValidationError) -> APIError:
    errors = error.errors()
    first = _param_path(errors[0]["loc"])
    if errors[0]["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{first}'.", first, "missing_required_parameter")
    # A union field fails once per accepted form; say what each form wanted.
    field_name = first.split(".")[0].split("[")[0]
    reasons = dict.fromkeys(e["msg"] for e in errors if _param_path(e["loc"]).startswith(field_name))
    return APIError(400, f"Invalid '{first}': {'; or '.join(reasons)}.", first, "invalid_value")


def parse_request(schema: type[Schema], body: bytes) -> Schema:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}.", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, not {type(data).__name__}.",
                       code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from e


async def read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large  # refuse before reading it
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


# ---- the generation worker -------------------------------------------------------------------

class CancellableGenerator(Generator):
    """A Generator that stops between two tokens once `cancel` is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cancel = threading.Event()  # the worker swaps in each job's own flag

    def generate_ids(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        with contextlib.closing(super().generate_ids(prompt, params)) as tokens:
            for token in tokens:
                yield token
                if self.cancel.is_set():
                    self.stats.finish_reason = "cancelled"
                    return


@dataclass
class Job:
    """One request's generation. The worker thread posts ("text", piece), then ("done", stats)
    or ("error", exception), onto `events`, which the request's handler reads on the event loop."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self.cancelled.set()


class GenerationWorker:
    """Runs jobs one at a time on one thread, in arrival order, with at most `max_queue` waiting."""

    def __init__(self, generator: CancellableGenerator, max_queue: int):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.generator = generator
        self.max_queue = max_queue
        self._waiting: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self.running: Job | None = None
        # Counters for /health; only the worker thread writes them.
        self.completed = self.cancelled = self.failed = self.generated_tokens = 0

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve_jobs, name="lutlm-generation", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._waiting.get_nowait()
                if job is not None:
                    job.cancelled.set()
        if self.running is not None:
            self.running.cancelled.set()
        self._waiting.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise APIError(
                429, f"The server is busy: {self.max_queue} requests are already waiting. Retry later.",
                code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"},
            ) from None

    def _serve_jobs(self) -> None:
        while (job := self._waiting.get()) is not None:
            if job.cancelled.is_set():  # its client left while it waited
                self.cancelled += 1
                continue
            self.running = job
            self._run(job)
            self.running = None

    def _run(self, job: Job) -> None:
        self.generator.cancel = job.cancelled
        try:
            for piece in self.generator.stream_text(job.prompt_ids, job.params):
                job.post("text", piece)
        except Exception as e:  # the worker must outlive any one request's failure
            self.failed += 1
            job.post("error", e)
            return
        self.generated_tokens += self.generator.stats.generated_tokens
        if job.cancelled.is_set():
            self.cancelled += 1
        else:
            self.completed += 1
            job.post("done", self.generator.stats)


# ---- response shapes -------------------------------------------------------------------------

class CompletionReply:
    """The /v1/completions response and stream chunk shapes."""

    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def opening_choice(self) -> dict | None:
        return None

    def stream_choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def full_choice(self, text: str, finish_reason: str) -> dict:
        return self.stream_choice(text, finish_reason)


class ChatReply:
    """The /v1/chat/completions response and stream chunk shapes."""

    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def opening_choice(self) -> dict | None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def stream_choice(self, text: str, finish_reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def full_choice(self, text: str, finish_reason: str) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}


def usage(stats: GenerationStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


def generation_failed(error: Exception) -> APIError:
    return APIError(500, f"Generation failed: {error}", kind="server_error")


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next message the server can deliver is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- the service -----------------------------------------------------------------------------

def model_id_for(checkpoint: Checkpoint) -> str:
    """The file or folder name without its extension, e.g. "SmolLM2-135M-Instruct.Q4_1"."""
    name = os.path.basename(os.path.normpath(checkpoint.source))
    return os.path.splitext(name)[0] if os.path.isfile(checkpoint.source) else name


class CompletionService:
    """Checks requests against the limits, queues them, and turns their jobs into responses."""

    def __init__(self, worker: GenerationWorker, tokenizer: Tokenizer, model_id: str, context_length: int,
                 max_tokens: int, max_body_bytes: int):
        self.worker = worker
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.context_length = context_length
        self.max_tokens = max_tokens
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "lutlm"}

    async def completion(self, request: Request) -> Response:
        req = parse_request(CompletionRequest, await read_body(request, self.max_body_bytes))
        self.check_model(req.model)
        prompt_ids = self._completion_prompt_ids(req.prompt)
        max_tokens = self._token_budget(prompt_ids, req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, "prompt")
        return await self._answer(request, req, prompt_ids, max_tokens, CompletionReply())

    async def chat_completion(self, request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await read_body(request, self.max_body_bytes))
        self.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
        except ValueError as e:
            raise APIError(400, str(e), "messages") from e
        requested = req.max_completion_tokens or req.max_tokens
        max_tokens = self._token_budget(prompt_ids, requested, self.max_tokens, "messages")
        return await self._answer(request, req, prompt_ids, max_tokens, ChatReply())

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_id}'.",
                           "model", "model_not_found")

    def _completion_prompt_ids(self, prompt: str | list) -> list[int]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            ids = self.tokenizer.encode(prompt if isinstance(prompt, str) else prompt[0])
        else:
            ids = prompt
            vocab = self.worker.generator.model.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"Token id {bad[0]} in 'prompt' is outside the vocabulary (0..{vocab - 1}).",
                               "prompt", "invalid_value")
        if not ids:
            raise APIError(400, "The prompt is empty.", "prompt", "invalid_value")
        return ids

    def _token_budget(self, prompt_ids: list[int], requested: int | None, default: int, prompt_param: str) -> int:
        """max_tokens for the request: what it asked (within the server's cap), else the default
        trimmed to the room left in the context; either way prompt + max_tokens must fit."""
        if requested is not None and requested > self.max_tokens:
            raise APIError(400, f"max_tokens is too large: {requested}. This server allows at most "
                                f"{self.max_tokens} completion tokens.", "max_tokens", "invalid_value")
        room = self.context_length - len(prompt_ids)
        max_tokens = requested if requested is not None else max(1, min(default, room))
        if len(prompt_ids) + max_tokens > self.context_length:
            raise APIError(
                400, f"This model's maximum context length is {self.context_length} tokens. However, you "
                     f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the {prompt_param}, "
                     f"{max_tokens} in the completion). Please reduce the length of the {prompt_param} or "
                     f"completion.", prompt_param, "context_length_exceeded",
            )
        return max_tokens

    async def _answer(self, request: Request, req: SamplingFields, prompt_ids: list[int], max_tokens: int,
                      reply: CompletionReply | ChatReply) -> Response:
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        # The schema's bounds are within SamplingParams' own, so this cannot raise.
        params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                                top_p=req.top_p, repetition_penalty=req.repetition_penalty, stop=stop, seed=req.seed)
        job = Job(prompt_ids, params, asyncio.get_running_loop())
        self.worker.submit(job)
        response_id = f"{reply.id_prefix}-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._stream(job, reply, response_id, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        gather = asyncio.create_task(self._gather(job))
        disconnect = asyncio.create_task(wait_for_disconnect(request))
        try:
            await asyncio.wait({gather, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            job.cancelled.set()  # if the client left, the worker stops; otherwise the job has ended anyway
        if not gather.done():
            gather.cancel()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        text, stats = gather.result()
        body = self._envelope(response_id, reply.object, [reply.full_choice(text, stats.finish_reason)])
        body["usage"] = usage(stats)
        return JSONResponse(body)

    def _envelope(self, response_id: str, kind: str, choices: list[dict]) -> dict:
        return {"id": response_id, "object": kind, "created": int(time.time()), "model": self.model_id,
                "choices": choices}

    @staticmethod
    async def _gather(job: Job) -> tuple[str, GenerationStats]:
        pieces = []
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                pieces.append(value)
            elif kind == "done":
                return "".join(pieces), value
            else:
                raise generation_failed(value)

    async def _stream(self, job: Job, reply: CompletionReply | ChatReply, response_id: str,
                      include_usage: bool) -> AsyncIterator[str]:
        chunk = lambda choices: self._envelope(response_id, reply.chunk_object, choices)  # noqa: E731
        try:
            if (opening := reply.opening_choice()) is not None:
                yield sse(chunk([opening]))
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield sse(chunk([reply.stream_choice(value, None)]))
                elif kind == "error":
                    yield sse(generation_failed(value).payload())
                    return
                else:
                    yield sse(chunk([reply.stream_choice("", value.finish_reason)]))
                    if include_usage:
                        yield sse(chunk([]) | {"usage": usage(value)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            # Runs when the stream ends and when the server cancels it because the client left.
            job.cancelled.set()


def create_app(model: Transformer, tokenizer: Tokenizer, checkpoint: Checkpoint, *, context_length: int = 2048,
               max_queue: int = 16, max_tokens: int = 1024, max_body_bytes: int = 1 << 20,
               model_id: str | None = None) -> FastAPI:
    """The HTTP app for one model. `max_queue` requests may wait while one generates; a request
    may ask for at most `max_tokens` new tokens, and prompt + max_tokens must fit `context_length`."""
    if not 1 <= context_length <= model.config.max_position_embeddings:
        raise ValueError(f"context_length must be in 1..{model.config.max_position_embeddings} "
                         f"(the model's positions), got {context_length}")
    if max_tokens < 1 or max_body_bytes < 1:
        raise ValueError(f"max_tokens and max_body_bytes must be >= 1, got {max_tokens} and {max_body_bytes}")
    worker = GenerationWorker(CancellableGenerator(model, tokenizer, context_length), max_queue)
    service = CompletionService(worker, tokenizer, model_id or model_id_for(checkpoint), context_length,
                                max_tokens, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="lutlm", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"Invalid URL ({request.method} {request.url.path}): {error.detail}."
        return APIError(error.status_code, message, code=str(error.detail).lower().replace(" ", "_")).response()

    @app.exception_handler(Exception)
    async def unexpected_error(_request: Request, error: Exception) -> JSONResponse:
        return APIError(500, f"Internal error: {type(error).__name__}: {error}", kind="server_error").response()

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        service.check_model(model)
        return service.model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.completion(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.chat_completion(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": service.model_id, "running": int(worker.running is not None),
                "waiting": worker.waiting, "completed": worker.completed, "cancelled": worker.cancelled,
                "failed": worker.failed, "generated_tokens": worker.generated_tokens}

    return app


@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                        startup_timeout: float = 60.0) -> Iterator[str]:
    """Run `app` with uvicorn on a background thread (port 0: any free one); yields its base URL."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lutlm-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the server on {host}:{port} did not start within {startup_timeout:.0f} s")
        time.sleep(0.02)
    try:
        yield f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(startup_timeout)
        sock.close()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def run(args: argparse.Namespace) -> None:
    """`lutlm serve` (its options: lutlm.cli): load the model and serve until interrupted."""
    from lutlm.cli import load

    model, tokenizer, checkpoint = load(args)
    app = create_app(model, tokenizer, checkpoint, context_length=args.ctx, max_queue=args.max_queue,
                     max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes, model_id=args.model_id)
    service = app.state.service
    print(f"serving '{service.model_id}' at http://{args.host}:{args.port}/v1", file=sys.stderr)
    if not is_loopback(args.host):
        print("warning: the server is reachable from other machines and has no authentication", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=5)
