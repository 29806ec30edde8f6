"""The FastAPI app: dialect routers, error handlers per dialect, /tokenize, /metrics, /health."""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import HearthError, InvalidRequestError, ModelNotFoundError
from ..sampling import SamplingParams
from . import embeddings, ollama, openai, tgi
from .common import Server, parse, server
from .errors import dialect_of, error_response, validation_message
from .metrics import Metrics
from .models import ModelManager, ServeConfig
from .openapi import install_openapi
from .security import install_security


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # an unknown field is a 400 (common.refuse_unknown)
    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None


def create_app(cfg: ServeConfig, on_fatal: Callable[[BaseException], None] | None = None,
               defer_preload: bool = False) -> FastAPI:
    """on_fatal(error): the start-up preload failed (the caller stops the server). defer_preload: the caller
    calls manager.begin_preload() itself once the port is bound (serve/lifecycle.py)."""
    manager = ModelManager(cfg, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await manager.start(preload=not defer_preload)
        try:
            yield
        finally:
            await manager.close()

    app = FastAPI(title="hearthlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.hearth = Server(cfg, manager, Metrics(manager), time.time())
    install_security(app, cfg)  # size, Host, Origin/CORS, API key, JSON-only bodies, admin routes
    install_openapi(app)  # /openapi.json with each route's request body

    def fail(request: Request, exc: BaseException) -> Response:
        dialect = dialect_of(request.url.path)
        resp = error_response(dialect, exc)
        if not getattr(exc, "counted", False):
            server(request).metrics.requests.labels(dialect, str(resp.status_code)).inc()
        return resp

    @app.exception_handler(HearthError)
    async def hearth_error(request: Request, exc: HearthError) -> Response:
        return fail(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        msg, param = validation_message(list(exc.errors()))
        return fail(request, InvalidRequestError(msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err: HearthError = InvalidRequestError(f"{request.method} {request.url.path}: {exc.detail}")
        err.http_status = exc.status_code  # type: ignore[misc]
        if exc.status_code == 404:
            err = ModelNotFoundError(f"no route {request.method} {request.url.path}")
            err.code = "not_found"  # type: ignore[misc]
        return fail(request, err)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        return fail(request, exc)

    app.include_router(openai.router)
    app.include_router(ollama.router)
    app.include_router(tgi.router)
    app.include_router(embeddings.router)  # /v1/embeddings, /api/embed, /api/embeddings

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root() -> PlainTextResponse:
        return PlainTextResponse("hearthlm is running")

    @app.get("/health")
    async def health(request: Request) -> Response:
        server(request).manager.check_available()  # 503 + Retry-After while loading or draining
        m = server(request).manager.current
        if m is not None and m.aengine.dead is not None:
            raise HearthError(f"engine dead: {m.aengine.dead}")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(server(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        from .common import off_loop

        body = await parse(request, TokenizeBody)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("send exactly one of prompt (text or token ids) or messages")
        srv: Server = server(request)
        m, _ = await srv.manager.acquire(body.model, purpose="any")  # embedding models count tokens too
        try:
            eng = m.engine

            def encode() -> list[int]:  # on a worker thread: templating and tokenizing never block the loop
                if body.messages is not None:
                    return eng.chat_prompt(body.messages, SamplingParams(max_tokens=None), refuse=False)[0]
                return eng.tokenize_prompt(body.prompt)  # type: ignore[arg-type]

            ids = await off_loop(encode)
            return {"tokens": ids, "count": len(ids), "max_model_len": eng.max_model_len, "model": m.name}
        finally:
            srv.manager.release(m)

    return app
