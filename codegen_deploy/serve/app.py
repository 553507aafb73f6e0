"""The HTTP server: OpenAI legacy Completions (and FauxPilot's engine path), Chat Completions and llama.cpp's
/infill over continuous batching.

create_app(settings) returns a FastAPI app that opens the model when it starts (its lifespan), so the
same app runs under uvicorn (codegen-serve) and as a Ray Serve ingress deployment (serve/ray.py).

This module holds the routes, error handlers, the gate in front of them (API key, body size) and request
counting only: settings.py has ServeSettings, state.py the ServerState (and the drain when it stops),
completions.py the completion core and the Completions API, chat.py the Chat Completions API, infill.py
/infill (ServeSettings and ServerState re-exported here).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import create_chat_completion
from .completions import create_completion
from .dialects import check_suffix_mode
from .infill import InfillRequest, create_infill
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, OpenAIError, error_body
from .settings import ServeSettings, check_served_name
from .state import ServerState

__all__ = ["ServeSettings", "ServerState", "create_app"]


def create_app(settings: ServeSettings, metrics: Metrics | None = None, state: ServerState | None = None) -> FastAPI:
    """The FastAPI app of codegen-serve. With `state` (opened by the caller with the same metrics), it serves
    that; without, the model opens when the app starts (a Ray Serve replica). Either closes when it stops."""
    check_suffix_mode(settings.suffix)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal state
        if state is None:
            state = await asyncio.to_thread(ServerState, settings, app.state.metrics)
        app.state.server = state
        try:
            yield
        finally:
            state.end_drain()  # requests still being answered end with an error, never cut
            await asyncio.to_thread(state.close)

    # /openapi.json goes through _Gate like every route but /health (it needs the key when one is set).
    app = FastAPI(title="codegen-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics if metrics is not None else state.metrics if state is not None else Metrics()
    app.state.settings = settings
    _install_error_handlers(app)
    app.add_middleware(_Gate, settings=settings)  # added first: runs inside the counter, which counts its 401s
    app.add_middleware(_RequestCounter, metrics=app.state.metrics)

    @app.get("/health")
    async def health(request: Request):
        state = request.app.state.server
        return {
            "status": "stopping" if state.draining else "ok",
            "model": settings.served_name,
            "pid": os.getpid(),  # tells replicas apart behind a proxy
            "backend": state.session.name,
            "active_rows": state.batcher.active_rows,
            "queue_depth": state.batcher.queue_depth,
        }

    @app.get("/metrics")
    async def metrics(request: Request):
        m = request.app.state.metrics
        return Response(m.render(), media_type=m.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [_model_card(settings, request.app.state.server)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):
        check_served_name(settings, model)  # the one name /v1/models lists, whatever --model-name allows
        return _model_card(settings, request.app.state.server)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(request, body, body.model, "model")

    @app.post("/v1/engines/{engine}/completions")
    async def engine_completions(engine: str, body: CompletionRequest, request: Request):
        return await create_completion(request, body, engine, "engine")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(request, body)

    @app.post("/infill")
    async def infill(body: InfillRequest, request: Request):
        return await create_infill(request, body)

    return app


def _model_card(settings: ServeSettings, state: ServerState) -> dict:
    # Whether the model fills in the middle, and what a request's `suffix` gets (see dialects.py).
    fim = state.fim is not None
    return {
        "id": settings.served_name,
        "object": "model",
        "created": 0,
        "owned_by": "codegen-deploy",
        "fill_in_the_middle": fim,
        "suffix": "filled in" if fim else "ignored" if settings.suffix == "ignore" else "refused",
    }


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
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(_not_json(first, e.body)), status_code=400)
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc) or "the body"
        message = f"Invalid value for {where}: {first.get('msg', 'not valid')}"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        elif isinstance(e.__cause__, UnicodeDecodeError):  # FastAPI's "There was an error parsing the body"
            bad = e.__cause__
            message = (
                f"The body is not UTF-8 text (byte 0x{bad.object[bad.start]:02x} at position {bad.start}): send "
                "the JSON body encoded in UTF-8"
            )
        else:
            message = str(e.detail)
        return JSONResponse(error_body(message), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return JSONResponse(
            error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"), status_code=500
        )


def _not_json(error: dict, body) -> str:
    """The message of a body that is not JSON: what the parser said and where (line, column), and what to send.
    FastAPI puts the character position where a field name goes (`loc`), so no `param` is named."""
    loc = error.get("loc", ())
    position = loc[-1] if loc and isinstance(loc[-1], int) else None
    reason = (error.get("ctx") or {}).get("error", "not valid JSON")
    where = ""
    if position is not None and isinstance(body, str):  # the text json.loads read
        line = body.count("\n", 0, position) + 1
        column = position - (body.rfind("\n", 0, position) + 1) + 1
        where = f" at line {line}, column {column}"
    elif position is not None:
        where = f" at offset {position}"
    return f"The body is not valid JSON ({reason}{where}): send one JSON object, encoded in UTF-8"


# The `endpoint` label of codegen_requests_total, by path; the FauxPilot engine path counts as completions and
# /v1/models/{name} as models; any other path (a 404) is "unknown", so a client probing for routes this server
# lacks never shows as traffic of one it has.
_ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat_completions",
    "/infill": "infill",
    "/v1/models": "models",
    "/health": "health",
    "/metrics": "metrics",
    "/openapi.json": "openapi",
}


def endpoint_label(path: str) -> str:
    """The `endpoint` label a request to `path` is counted under."""
    if path in _ENDPOINTS:
        return _ENDPOINTS[path]
    parts = path.split("/")  # "", "v1", "engines", ENGINE, "completions"
    if len(parts) == 5 and parts[1:3] == ["v1", "engines"] and parts[3] and parts[4] == "completions":
        return "completions"
    if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        return "models"
    return "unknown"


class _RequestCounter:
    """ASGI middleware counting HTTP requests by endpoint (endpoint_label) and status (streams count when their
    status is sent)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_label(scope.get("path", ""))

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.request(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


class _Gate:
    """ASGI middleware in front of every route: the API key and the body's size are checked from the headers,
    before any of the body is read, so a client without the key or with too large a body costs nothing.

    Every route but /health needs `Authorization: Bearer KEY` when the settings have a key (401). A body over
    settings.max_body_bytes gets a 413 at once when its Content-Length says so; a chunked body (no length
    given) is read here up to the limit, then handed on.
    """

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.key = bearer_key(settings)
        self.limit = settings.max_body_bytes
        self.limit_text = f"{settings.max_body_mb:g} MB"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # lower-case names; a repeated header keeps its last value
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await _answer(send, 400, error_body("Content-Length is not a whole number"), close=True)
        size = None if length is None else int(length)
        chunked = b"transfer-encoding" in headers  # a body of unknown size
        if not self._authorized(scope["path"], headers.get(b"authorization", b"")):
            message = "Incorrect or missing API key: send the header `Authorization: Bearer KEY`"
            # A large or unknown body is not read, nor drained: the connection ends with the answer.
            close = chunked or (size or 0) > self.limit
            return await _answer(send, 401, error_body(message, code="invalid_api_key"), close=close)
        if size is not None and size > self.limit:
            return await _answer(send, 413, self._too_large(f"{size:,} bytes"), close=True)
        if not chunked:
            return await self.app(scope, receive, send)
        # A chunked body: read it here, up to the limit, then hand it on.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _answer(send, 413, self._too_large(f"over {self.limit:,} bytes"), close=True)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the client to go away
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    def _authorized(self, path: str, given: bytes) -> bool:
        return authorized(self.key, path, given)

    def _too_large(self, size: str) -> dict:
        return error_body(
            f"The request body is {size}, more than this server takes ({self.limit_text}, --max-body-mb): "
            "send a shorter prompt (it must fit the model's context anyway)",
            code="request_too_large",
        )


def bearer_key(settings: ServeSettings) -> bytes | None:
    """The Authorization header a request must send (None: no key is set)."""
    return None if settings.api_key is None else f"Bearer {settings.api_key}".encode()


def authorized(key: bytes | None, path: str, given: bytes) -> bool:
    """Whether a request to `path` whose Authorization header is `given` may pass: every route but /health needs
    the key when one is set."""
    return key is None or path == "/health" or hmac.compare_digest(given, key)


async def _answer(send, status: int, body: dict, close: bool = False) -> None:
    """Send a whole JSON response; `close` ends the connection after it (a body left unread is not read)."""
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
