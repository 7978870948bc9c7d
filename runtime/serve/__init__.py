"""ember's OpenAI-compatible HTTP server (FastAPI on uvicorn), over already-loaded pipelines.

:func:`~.app.create_app` builds the ASGI application from a :class:`~.state.ServedModels` (the continuous-batching
engine of a text-generation pipeline and/or an embeddings pipeline); ``ember serve`` (``ember.tools.serve``) loads
the models and runs it. One module per concept: request and response schemas, errors, authentication, the request
body limit, server-sent events, stop strings, the generation of one choice, the endpoints, metrics.
"""
from __future__ import annotations

from .app import create_app
from .state import ServedEmbedder, ServedGenerator, ServedModels, ServerSettings

__all__ = ["ServedEmbedder", "ServedGenerator", "ServedModels", "ServerSettings", "create_app"]
