"""The HTTP server: OpenAI legacy Completions (and FauxPilot's engine path) over continuous batching.

create_app(settings) returns a FastAPI app that opens the model when it starts (its lifespan), so the
same app runs under uvicorn (codegen-serve) and as a Ray Serve ingress deployment (serve/ray.py).

This module holds the routes, error handlers and request counting only: settings.py has ServeSettings,
state.py the ServerState, completions.py the completion requests' work (both re-exported here).
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .completions import create_completion
from .dialects import check_suffix_mode
from .metrics import Metrics
from .schemas import CompletionRequest, OpenAIError, error_body
from .settings import ServeSettings, check_model
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
        check_model(settings, model, "model")
        return _model_card(settings)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(request, body, body.model, "model")

    @app.post("/v1/engines/{engine}/completions", dependencies=auth)
    async def engine_completions(engine: str, body: CompletionRequest, request: Request):
        return await create_completion(request, body, engine, "engine")

    return app


def _model_card(settings: ServeSettings) -> dict:
    # CodeGen1 has no fill-in-the-middle: say what a request's `suffix` gets (see dialects.py).
    return {
        "id": settings.served_name,
        "object": "model",
        "created": 0,
        "owned_by": "codegen-deploy",
        "fill_in_the_middle": False,
        "suffix": "ignored" if settings.suffix == "ignore" else "refused",
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
