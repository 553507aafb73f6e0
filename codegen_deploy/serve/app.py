"""The HTTP server: OpenAI legacy Completions (and FauxPilot's engine path) over continuous batching.

create_app(settings) returns a FastAPI app that opens the model when it starts (its lifespan), so the
same app runs under uvicorn (codegen-serve) and as a Ray Serve ingress deployment (serve/ray.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CodegenDeployError
from ..runtime.sampling import SamplingConfig
from .batcher import Batcher, QueueFull, RowSpec, RowUpdate
from .metrics import Metrics
from .schemas import CompletionRequest, OpenAIError, bad_request, error_body

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.1


@dataclass(frozen=True)
class ServeSettings:
    """What codegen-serve serves and how.

    path: export folder, engine or checkpoint; backend: torch | onnxruntime | tensorrt (default: the
    artifact's own). model_name: the name /v1/models lists; when given, requests naming another model get
    a 404 (when not, any model name is accepted and the folder's name is listed). api_key: when set, every
    route but /health needs `Authorization: Bearer KEY`. max_batch: rows generating at once; max_queue:
    rows waiting at most (429 beyond). threads, providers, max_context: the session's options;
    device_options: backend_options()' GPU keywords (device, device_id, tf32, cuda_graph).
    """

    path: str
    backend: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    model_name: str | None = None
    api_key: str | None = None
    threads: int | None = None
    providers: str | None = None
    max_context: int | None = None
    tokenizer: str | None = None
    device_options: dict = field(default_factory=dict)

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.path).resolve().name


class ServerState:
    """The model, tokenizer, metrics and batcher of one running server (one replica)."""

    def __init__(self, settings: ServeSettings, metrics: Metrics):
        from ..model.tokenizer import load_tokenizer
        from ..runtime.backends import backend_options, default_backend, open_session

        self.settings = settings
        self.metrics = metrics
        backend = settings.backend or default_backend(settings.path)
        self.tokenizer = load_tokenizer(settings.tokenizer or settings.path)
        options = backend_options(
            backend, threads=settings.threads, providers=settings.providers, **settings.device_options
        )
        if settings.max_context:
            options["max_context"] = settings.max_context
        self.session = open_session(backend, settings.path, **options)
        self.vocab_size = self.session.config.vocab_size
        self.batcher = Batcher(self.session, self.tokenizer, settings.max_batch, settings.max_queue, metrics)
        self.batcher.start()

    def close(self) -> None:
        # A step still running holds the session's buffers (ONNX Runtime writes to their addresses): closing
        # the session under it could crash the process, so a worker that did not end keeps the session.
        if self.batcher.stop():
            self.session.close()


def create_app(settings: ServeSettings, metrics: Metrics | None = None, state: ServerState | None = None) -> FastAPI:
    """The FastAPI app of codegen-serve. With `state` (opened by the caller with the same metrics), it serves
    that; without, the model opens when the app starts (a Ray Serve replica). Either closes when it stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal state
        if state is None:
            state = await asyncio.to_thread(ServerState, settings, app.state.metrics)
        app.state.server = state
        try:
            yield
        finally:
            await asyncio.to_thread(state.close)

    app = FastAPI(title="codegen-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics if metrics is not None else state.metrics if state is not None else Metrics()
    app.state.settings = settings
    _install_error_handlers(app)
    app.add_middleware(_RequestCounter, metrics=app.state.metrics)

    def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {settings.api_key}":
            raise OpenAIError(
                401, "Incorrect or missing API key: send the header `Authorization: Bearer KEY`", code="invalid_api_key"
            )

    auth = [Depends(authorized)]

    @app.get("/health")
    async def health(request: Request):
        state = request.app.state.server
        return {
            "status": "ok",
            "model": settings.served_name,
            "pid": os.getpid(),  # tells replicas apart behind a proxy
            "backend": state.session.name,
            "active_rows": state.batcher.active_rows,
            "queue_depth": state.batcher.queue_depth,
        }

    @app.get("/metrics", dependencies=auth)
    async def metrics(request: Request):
        m = request.app.state.metrics
        return Response(m.render(), media_type=m.content_type)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [_model_card(settings)]}

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def model(model: str):
        _check_model(settings, model, "model")
        return _model_card(settings)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        return await _complete(request, body, body.model, "model")

    @app.post("/v1/engines/{engine}/completions", dependencies=auth)
    async def engine_completions(engine: str, body: CompletionRequest, request: Request):
        return await _complete(request, body, engine, "engine")

    return app


def _model_card(settings: ServeSettings) -> dict:
    return {"id": settings.served_name, "object": "model", "created": 0, "owned_by": "codegen-deploy"}


def _check_model(settings: ServeSettings, name: str | None, param: str) -> None:
    if settings.model_name is not None and name is not None and name != settings.model_name:
        raise OpenAIError(
            404,
            f"The model `{name}` does not exist: this server serves `{settings.model_name}`",
            param=param,
            code="model_not_found",
        )


# ---------------------------------------------------------------------------------------------------------
# Completions


@dataclass
class _Choice:
    """One choice being assembled: its prompt, text so far, tokens and logprobs, and how it ended."""

    index: int
    prompt_index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


def _row_specs(state: ServerState, body: CompletionRequest) -> tuple[list[list[int]], list[RowSpec]]:
    """Encode the prompts and make one RowSpec per (prompt, choice), in OpenAI's index order."""
    body.check()
    prompts = []
    for i, p in enumerate(body.prompts()):
        ids = state.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise bad_request(f"prompt {i} is empty: give at least one character or token", "prompt")
        if min(ids) < 0 or max(ids) >= state.vocab_size:
            raise bad_request(f"prompt {i} has a token id outside 0..{state.vocab_size - 1}", "prompt")
        prompts.append(ids)
    max_tokens = body.max_tokens or 16
    context = state.session.max_context
    for ids in prompts:
        if len(ids) + max_tokens > context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens, however you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in your prompt; {max_tokens} for the completion). "
                "Please reduce your prompt; or completion length.",
                "prompt",
                "context_length_exceeded",
            )
    n = body.n or 1
    holds = state.batcher.max_queue + state.batcher.max_batch
    if len(prompts) * n > holds:
        raise bad_request(
            f"{len(prompts)} prompts x n={n} make {len(prompts) * n} rows, more than this server ever holds "
            f"({holds}): send fewer prompts or a smaller n",
            "n",
        )
    bias = []
    for key, value in (body.logit_bias or {}).items():
        if not 0 <= int(key) < state.vocab_size:
            raise bad_request(f"logit_bias token {key} is outside 0..{state.vocab_size - 1}", "logit_bias")
        bias.append((int(key), float(value)))
    temperature = 1.0 if body.temperature is None else body.temperature
    specs = []
    for ids in prompts:
        for j in range(n):
            # Each choice its own stream of random numbers: seed, seed + 1, ... (reproducible with a seed).
            sampling = SamplingConfig(
                temperature=temperature,
                top_p=body.top_p or 1.0,
                top_k=body.top_k or 0,
                seed=None if body.seed is None else body.seed + j,
            )
            specs.append(
                RowSpec(
                    tuple(ids),
                    max_tokens,
                    sampling,
                    body.stop_strings,
                    body.logprobs,
                    body.presence_penalty or 0.0,
                    body.frequency_penalty or 0.0,
                    tuple(bias),
                )
            )
    return prompts, specs


async def _complete(request: Request, body: CompletionRequest, model: str | None, param: str):
    state: ServerState = request.app.state.server
    _check_model(state.settings, model, param)
    try:
        prompts, specs = _row_specs(state, body)
    except CodegenDeployError as e:
        raise bad_request(str(e)) from e
    n = body.n or 1
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()

    def sink(index: int):
        return lambda update: loop.call_soon_threadsafe(updates.put_nowait, (index, update))

    try:
        rows = state.batcher.submit(specs, [sink(i) for i in range(len(specs))])
    except QueueFull as e:
        raise OpenAIError(
            429,
            f"The server is busy ({e}): retry after a moment",
            type="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        ) from e
    state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * n)
    echo = [state.tokenizer.decode(p) for p in prompts] if body.echo else None
    meta = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.settings.served_name,
    }
    choices = [_Choice(i, i // n) for i in range(len(specs))]
    usage_prompt = sum(len(p) for p in prompts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(rows, updates, choices, meta, echo, include_usage, usage_prompt, state)
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    return await _collect(request, rows, updates, choices, meta, echo, usage_prompt, state)


def _logprobs_piece(state: ServerState, update: RowUpdate, offset: int) -> dict | None:
    """OpenAI's legacy logprobs object for the tokens of one update, text offsets counted from `offset`."""
    if update.logprobs is None:
        return None
    decode = state.tokenizer.decode
    tokens = [decode([t]) for t in update.tokens]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = [{decode([t]): lp for t, lp in d.items()} for d in update.top_logprobs]
    return {"tokens": tokens, "token_logprobs": update.logprobs, "top_logprobs": top, "text_offset": offsets}


def _merge_logprobs(into: dict | None, piece: dict | None) -> dict | None:
    if piece is None:
        return into
    if into is None:
        return piece
    for key in into:
        into[key].extend(piece[key])
    return into


async def _collect(request, rows, updates, choices, meta, echo, usage_prompt, state) -> JSONResponse:
    """Wait for every row to end (cancelling them all if the client goes away); answer one JSON body."""
    logprobs: list[dict | None] = [None] * len(choices)
    offsets = [len(echo[c.prompt_index]) if echo else 0 for c in choices]
    remaining = len(choices)
    checked = time.monotonic()
    try:
        while remaining:
            # Updates may arrive every few ms: look at the connection on a clock, not only when idle.
            if time.monotonic() - checked > DISCONNECT_POLL_S:
                if await request.is_disconnected():
                    return JSONResponse(error_body("the client disconnected"), status_code=499)
                checked = time.monotonic()
            try:
                index, update = await asyncio.wait_for(updates.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
            if update.error:
                raise OpenAIError(500, update.error, type="server_error")
            c = choices[index]
            c.text += update.text
            c.tokens += len(update.tokens)
            piece = _logprobs_piece(state, update, offsets[index])
            offsets[index] += sum(len(t) for t in piece["tokens"]) if piece else 0
            logprobs[index] = _merge_logprobs(logprobs[index], piece)
            if update.finish_reason:
                c.finish_reason = update.finish_reason
                remaining -= 1
    finally:
        for row in rows:
            row.cancel()
    completion_tokens = sum(c.tokens for c in choices)
    body = {
        **meta,
        "choices": [
            {
                "index": c.index,
                "text": (echo[c.prompt_index] if echo else "") + c.text,
                "logprobs": logprobs[c.index],
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": {
            "prompt_tokens": usage_prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": usage_prompt + completion_tokens,
        },
    }
    return JSONResponse(body)


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _stream(rows, updates, choices, meta, echo, include_usage, usage_prompt, state) -> AsyncIterator[bytes]:
    """Server-Sent Events: a chunk per new piece of text, finish_reason on each choice's last chunk, the
    usage chunk when asked, then [DONE]. A client that goes away cancels its rows (finally below)."""
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return _sse({**meta, "choices": [choice], **extra})

    offsets = [len(echo[c.prompt_index]) if echo else 0 for c in choices]
    remaining = len(choices)
    try:
        if echo:
            for c in choices:
                yield chunk(c.index, echo[c.prompt_index], None)
        while remaining:
            index, update = await updates.get()
            if update.error:
                yield _sse(error_body(update.error, type="server_error"))
                return
            c = choices[index]
            c.tokens += len(update.tokens)
            piece = _logprobs_piece(state, update, offsets[index])
            offsets[index] += sum(len(t) for t in piece["tokens"]) if piece else 0
            if update.finish_reason:
                remaining -= 1
            if update.text or update.finish_reason or piece:
                yield chunk(c.index, update.text, update.finish_reason, piece)
        if include_usage:
            completion_tokens = sum(c.tokens for c in choices)
            usage = {
                "prompt_tokens": usage_prompt,
                "completion_tokens": completion_tokens,
                "total_tokens": usage_prompt + completion_tokens,
            }
            yield _sse({**meta, "choices": [], "usage": usage})
        yield _sse("[DONE]")
    finally:
        for row in rows:
            row.cancel()


# ---------------------------------------------------------------------------------------------------------
# Errors and request counting


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, e: OpenAIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc) or "the body"
        message = f"Invalid value for {where}: {first.get('msg', 'not valid')}"
        if first.get("type") == "json_invalid":
            message = "The body is not valid JSON: send a JSON object"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return JSONResponse(error_body(message), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return JSONResponse(
            error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"), status_code=500
        )


class _RequestCounter:
    """ASGI middleware counting HTTP requests by endpoint and status (streams count when their status is sent)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = "completions" if path.endswith("/completions") else "models" if "/models" in path else "other"
        if path in ("/metrics", "/health"):
            endpoint = path[1:]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.request(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
