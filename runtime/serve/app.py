"""The ASGI application: OpenAI's routes over the served models, plus ``/health`` and ``/metrics``.

Why FastAPI on uvicorn: the request and response bodies are pydantic models (validation with field paths for
OpenAI-style 400s, a compiled JSON serializer for the per-token chunks of a stream), Starlette's streaming response
notices a client that disconnects (which cancels its request on the engine), and uvicorn is a maintained ASGI
server of pure-Python wheels with a bounded graceful shutdown; vLLM's server is built the same way.

At shutdown (the lifespan's end, after uvicorn has let running responses finish or cancelled them at its
timeout) whatever is still on the engine is cancelled and the worker threads are joined.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .auth import APIKeyMiddleware
from .body_limit import BodyLimitMiddleware
from .chat import router as chat_router
from .completions import router as completions_router
from .embeddings import router as embeddings_router
from .errors import install_error_handlers
from .metrics import CONTENT_TYPE, ServerMetrics
from .response_schemas import ModelCard, ModelList
from .state import ServedModels

logger = logging.getLogger(__name__)


def create_app(models: ServedModels) -> FastAPI:
    """The server for ``models`` (already loaded); run it with any ASGI server (``ember serve`` uses uvicorn)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if models.generator is not None:
            cancelled = models.generator.abort_all()
            if cancelled:
                logger.warning("shutdown: cancelled %d unfinished request(s)", cancelled)
            models.generator.async_engine.shutdown()
        if models.embedder is not None:
            models.embedder.shutdown()

    app = FastAPI(title="ember", summary="OpenAI-compatible API over ember's engine", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = models
    app.state.metrics = ServerMetrics()
    if models.generator is not None:
        app.state.metrics.watch(models.generator.engine, models.generator.name)
    if models.embedder is not None:
        app.state.metrics.embedded_tokens.labels(models.embedder.name)  # the series exists from 0 on
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=models.settings.max_body_bytes)
    if models.settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=models.settings.api_key)  # outermost: before the body is read
    app.include_router(completions_router)
    app.include_router(chat_router)
    app.include_router(embeddings_router)

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "models": [m.name for m in models.cards()]}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=m.name, created=m.created, max_model_len=m.max_length)
                               for m in models.cards()])

    return app
