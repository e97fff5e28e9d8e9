"""OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions, and /health
(slots, queue and counters).

Generation runs on lutlm.engine's loop, which decodes every running request together as one
batch (continuous batching): `parallel` requests run at once, each in a KV cache slot of
`context_length` positions, and up to `max_queue` more wait for a slot; beyond that a request
gets 429. Streamed answers are server-sent events (`data: {...}`, then `data: [DONE]`). A client
that disconnects cancels its request, which leaves the batch at the next step. Parameters the
server does not implement are refused, not ignored. Every refused request gets OpenAI's error
shape: ``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Iterator, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lutlm.engine import DEFAULT_STEP_TOKENS, Engine, QueueFull, TokenLogprob
from lutlm.engine import Request as GenerationRequest
from lutlm.formats import Checkpoint
from lutlm.generate import GenerationStats, SamplingParams
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
    # Strict like OpenAI ("5" is not an integer); unknown fields (user, metadata, ...) are ignored, but
    # those that would change the answer and are not implemented are refused first (UNSUPPORTED).
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Schema):
    include_usage: bool = False


class SamplingFields(Schema):
    """Fields both endpoints share. top_k, repetition_penalty and ignore_eos are extensions, as in
    llama.cpp's server."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    n: Literal[1] = 1  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: int | None = Field(None, ge=0, le=5)  # the most likely alternatives per token

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


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
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def top_logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs' to be true.", "top_logprobs", "invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


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


def _unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


# Parameters OpenAI defines that this server does not implement: name -> whether a value is
# harmless (absent, or the default). Any other value is refused rather than silently ignored.
UNSUPPORTED = {
    "tools": _unset, "functions": _unset, "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"), "parallel_tool_calls": lambda v: v is None,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "logit_bias": _unset,
    "presence_penalty": lambda v: v in (None, 0), "frequency_penalty": lambda v: v in (None, 0),
    "echo": _unset, "best_of": lambda v: v in (None, 1), "suffix": lambda v: v in (None, ""),
    "audio": _unset, "modalities": lambda v: v in (None, ["text"]), "prediction": _unset,
}


def refuse_unsupported(data: dict) -> None:
    for name, harmless in UNSUPPORTED.items():
        if name in data and not harmless(data[name]):
            raise APIError(400, f"'{name}' is not supported by this server; leave it out.", name,
                           "unsupported_parameter")


def parse_request(schema: type[Schema], body: bytes) -> Schema:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}.", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, not {type(data).__name__}.",
                       code="invalid_json")
    refuse_unsupported(data)
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


# ---- requests on the engine -----------------------------------------------------------------

@dataclass
class Job:
    """One request's events, carried from the engine's thread to the request's handler on the
    event loop: ("text", piece), then ("done", stats) or ("error", exception)."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self.cancelled.set()


# ---- response shapes -------------------------------------------------------------------------

class CompletionReply:
    """The /v1/completions response and stream chunk shapes. `tokenizer`: where logprobs were
    asked for, to spell the tokens (their text offsets count from the completion's start)."""

    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer
        self.offset = 0

    def opening_choice(self) -> dict | None:
        return None

    def stream_choice(self, text: str, finish_reason: str | None, tokens: list[TokenLogprob] = ()) -> dict:
        return {"index": 0, "text": text, "logprobs": self.logprobs(tokens), "finish_reason": finish_reason}

    def full_choice(self, text: str, finish_reason: str, tokens: list[TokenLogprob] = ()) -> dict:
        return self.stream_choice(text, finish_reason, tokens)

    def logprobs(self, tokens: list[TokenLogprob]) -> dict | None:
        if self.tokenizer is None:
            return None
        spell = self.tokenizer.decode
        texts = [spell([t.token]) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [self._by_text(t.top) for t in tokens], "text_offset": offsets}

    def _by_text(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """{text: logprob}, most likely first; tokens that read the same (bytes of an unfinished
        character all read "\ufffd") keep the likelier one."""
        by_text = {}
        for token, logprob in top:
            by_text.setdefault(self.tokenizer.decode([token]), logprob)
        return by_text


class ChatReply:
    """The /v1/chat/completions response and stream chunk shapes (`tokenizer`: as CompletionReply's)."""

    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer

    def opening_choice(self) -> dict | None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def stream_choice(self, text: str, finish_reason: str | None, tokens: list[TokenLogprob] = ()) -> dict:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": self.logprobs(tokens), "finish_reason": finish_reason}

    def full_choice(self, text: str, finish_reason: str, tokens: list[TokenLogprob] = ()) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": self.logprobs(tokens), "finish_reason": finish_reason}

    def logprobs(self, tokens: list[TokenLogprob]) -> dict | None:
        if self.tokenizer is None:
            return None

        def entry(token: int, logprob: float) -> dict:
            text = self.tokenizer.decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in tokens]}


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
    """Checks requests against the limits, submits them to the engine, and turns their jobs into
    responses."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_id: str, context_length: int,
                 max_tokens: int, max_body_bytes: int):
        self.engine = engine
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
        top = req.top_logprobs_wanted()
        reply = CompletionReply(self.tokenizer if top is not None else None)
        return await self._answer(request, req, prompt_ids, max_tokens, reply, top)

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
        top = req.top_logprobs_wanted()
        return await self._answer(request, req, prompt_ids, max_tokens,
                                  ChatReply(self.tokenizer if top is not None else None), top)

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_id}'.",
                           "model", "model_not_found")

    def _completion_prompt_ids(self, prompt: str | list) -> list[int]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            try:  # text a tokenizer cannot take (a lone surrogate) is the client's error
                ids = self.tokenizer.encode(prompt if isinstance(prompt, str) else prompt[0])
            except ValueError as e:
                raise APIError(400, str(e), "prompt", "invalid_value") from e
        else:
            ids = prompt
            vocab = self.engine.model.config.vocab_size
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
                      reply: CompletionReply | ChatReply, top_logprobs: int | None) -> Response:
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        # The schema's bounds are within SamplingParams' own, so this cannot raise.
        params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                                top_p=req.top_p, repetition_penalty=req.repetition_penalty, stop=stop, seed=req.seed,
                                ignore_eos=req.ignore_eos)
        job = Job(asyncio.get_running_loop())
        self.submit(GenerationRequest(prompt_ids, params, job.post, job.cancelled, top_logprobs))
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
            job.cancelled.set()  # if the client left, the engine drops it; otherwise the job has ended anyway
        if not gather.done():
            gather.cancel()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        text, stats, tokens = gather.result()
        body = self._envelope(response_id, reply.object, [reply.full_choice(text, stats.finish_reason, tokens)])
        body["usage"] = usage(stats)
        return JSONResponse(body)

    def submit(self, request: GenerationRequest) -> None:
        try:
            self.engine.submit(request)
        except QueueFull:
            raise APIError(
                429, f"The server is busy: all {self.engine.slots} slots are generating and {self.engine.max_queue} "
                     f"requests are already waiting. Retry later.",
                code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"},
            ) from None

    def health(self) -> dict:
        e = self.engine
        return {"status": "ok", "model": self.model_id, "slots": e.slots, "running": e.running,
                "waiting": len(e.waiting), "completed": e.completed, "cancelled": e.cancelled, "failed": e.failed,
                "generated_tokens": e.generated_tokens, "steps": e.steps}

    def _envelope(self, response_id: str, kind: str, choices: list[dict]) -> dict:
        return {"id": response_id, "object": kind, "created": int(time.time()), "model": self.model_id,
                "choices": choices}

    @staticmethod
    async def _gather(job: Job) -> tuple[str, GenerationStats, list[TokenLogprob]]:
        pieces, tokens = [], []
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                pieces.append(value)
            elif kind == "token":
                tokens.append(value)
            elif kind == "done":
                return "".join(pieces), value, tokens
            else:
                raise generation_failed(value)

    async def _stream(self, job: Job, reply: CompletionReply | ChatReply, response_id: str,
                      include_usage: bool) -> AsyncIterator[str]:
        chunk = lambda choices: self._envelope(response_id, reply.chunk_object, choices)  # noqa: E731
        try:
            if (opening := reply.opening_choice()) is not None:
                yield sse(chunk([opening]))
            tokens = []  # logprobs of the tokens whose text has not been sent yet
            while True:
                kind, value = await job.events.get()
                if kind == "token":
                    tokens.append(value)
                elif kind == "text":
                    yield sse(chunk([reply.stream_choice(value, None, tokens)]))
                    tokens = []
                elif kind == "error":
                    yield sse(generation_failed(value).payload())
                    return
                else:
                    yield sse(chunk([reply.stream_choice("", value.finish_reason, tokens)]))
                    if include_usage:
                        yield sse(chunk([]) | {"usage": usage(value)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            # Runs when the stream ends and when the server cancels it because the client left.
            job.cancelled.set()


def create_app(model: Transformer, tokenizer: Tokenizer, checkpoint: Checkpoint, *, context_length: int = 2048,
               parallel: int = 4, max_queue: int = 16, max_tokens: int = 1024, max_body_bytes: int = 1 << 20,
               step_tokens: int = DEFAULT_STEP_TOKENS, model_id: str | None = None) -> FastAPI:
    """The HTTP app for one model. `parallel` requests generate together, each with a KV cache
    slot of `context_length` positions (prompt + max_tokens must fit it), and `max_queue` more may
    wait for a slot; a request may ask for at most `max_tokens` new tokens. A step of the engine
    runs at most `step_tokens` rows (lutlm.engine)."""
    if not 1 <= context_length <= model.config.max_position_embeddings:
        raise ValueError(f"context_length must be in 1..{model.config.max_position_embeddings} "
                         f"(the model's positions), got {context_length}")
    if max_tokens < 1 or max_body_bytes < 1:
        raise ValueError(f"max_tokens and max_body_bytes must be >= 1, got {max_tokens} and {max_body_bytes}")
    if parallel < 1:
        raise ValueError(f"parallel (slots) must be >= 1, got {parallel}")
    engine = Engine(model, tokenizer, parallel, context_length, max_queue, step_tokens)
    service = CompletionService(engine, tokenizer, model_id or model_id_for(checkpoint), context_length,
                                max_tokens, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

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
        return service.health()

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
    from lutlm.loader import load_for_command

    model, tokenizer, checkpoint = load_for_command(args)
    app = create_app(model, tokenizer, checkpoint, context_length=args.ctx, parallel=args.parallel,
                     max_queue=args.max_queue, max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes,
                     step_tokens=args.step_tokens, model_id=args.model_id)
    service = app.state.service
    print(f"serving '{service.model_id}' at http://{args.host}:{args.port}/v1 ({args.parallel} slots of "
          f"{args.ctx} tokens)", file=sys.stderr)
    if not is_loopback(args.host):
        print("warning: the server is reachable from other machines and has no authentication", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=5)
