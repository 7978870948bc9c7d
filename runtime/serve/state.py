"""What a server serves: the loaded models under their public names, and the server's own settings.

The server takes pipelines that are already loaded (``ember serve`` loads them, tests build them in process), so
that nothing in ``runtime/serve`` compiles, fetches or reads a model's files.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..engine import AsyncLLMEngine, LLMEngine
from ..scheduler import SchedulerConfig
from .body_limit import DEFAULT_MAX_BODY_BYTES
from .errors import APIError


@dataclass(frozen=True)
class ServerSettings:
    """``api_key``: required on ``/v1`` routes when set. ``max_body_bytes``: larger request bodies get 413."""

    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class ServedGenerator:
    """A text-generation pipeline behind the continuous-batching engine (``AsyncLLMEngine``), and its tokenizer."""

    def __init__(self, name: str, pipeline: Any, tokenizer: Any, scheduler: SchedulerConfig | None = None):
        self.name = name
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.engine = LLMEngine(pipeline, scheduler)
        self.async_engine = AsyncLLMEngine(self.engine)
        self.created = int(time.time())

    @property
    def max_length(self) -> int:
        return self.pipeline.max_length

    @property
    def vocab_size(self) -> int:
        return self.pipeline.pipeline_model.vocab_size

    def abort_all(self) -> int:
        """Cancel every request in flight (shutdown): their KV cache is freed; returns how many there were."""
        request_ids = list(self.engine.scheduler.requests)
        for request_id in request_ids:
            self.engine.abort_request(request_id)
        return len(request_ids)


class ServedEmbedder:
    """An embeddings pipeline; its batches run one at a time in a worker thread, off the event loop."""

    def __init__(self, name: str, pipeline: Any):
        self.name = name
        self.pipeline = pipeline
        self.created = int(time.time())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-embed")

    @property
    def max_length(self) -> int:
        return self.pipeline.max_length

    async def embed(self, texts: list[str]) -> tuple[Any, int]:
        """``[len(texts), dim]`` embeddings (``EmbeddingsPipeline.encode``, as ``ember embed`` runs it) and the
        number of tokens they took. A text longer than the model's maximum is a ValueError naming it, when the
        pipeline was loaded with truncation off."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._embed, texts)

    def _embed(self, texts: list[str]) -> tuple[Any, int]:
        tokens = sum(len(ids) for ids in self.pipeline.tokenize(texts))
        return self.pipeline.encode(texts), tokens

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass
class ServedModels:
    """The models of one server: at most one text-generation model and one embeddings model."""

    generator: ServedGenerator | None = None
    embedder: ServedEmbedder | None = None
    settings: ServerSettings = field(default_factory=ServerSettings)

    def __post_init__(self) -> None:
        if self.generator is None and self.embedder is None:
            raise ValueError("a server needs a text-generation model, an embeddings model, or both")
        if self.generator is not None and self.embedder is not None and self.generator.name == self.embedder.name:
            raise ValueError(f"the generation and embeddings models are both named {self.generator.name!r}")

    def cards(self) -> list[ServedGenerator | ServedEmbedder]:
        return [m for m in (self.generator, self.embedder) if m is not None]

    def text_model(self, name: str) -> ServedGenerator:
        """The text-generation model called ``name``: a 404 naming the served models otherwise."""
        if self.generator is not None and self.generator.name == name:
            return self.generator
        raise self._unknown(name, self.generator, "text generation")

    def embeddings_model(self, name: str) -> ServedEmbedder:
        if self.embedder is not None and self.embedder.name == name:
            return self.embedder
        raise self._unknown(name, self.embedder, "embeddings")

    def _unknown(self, name: str, served: Any, task: str) -> APIError:
        which = f"the {task} model served here is {served.name!r}" if served is not None else \
            f"this server serves no {task} model"
        return APIError(404, f"the model {name!r} does not exist: {which}", param="model", code="model_not_found")
