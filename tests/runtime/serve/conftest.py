"""One real server for the module tests of ``ember.runtime.serve``: uvicorn on 127.0.0.1 (a port the system picks)
in a thread of the test process, serving the tiny chat Llama (paged KV cache, 64 requests at a time) and the tiny BERT,
and a second, separately loaded copy of each pipeline for the expected values (``ember generate``'s and
``ember embed``'s code paths), so that nothing a test computes shares the server's engine."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .tiny_serving_models import make_chat_llama, make_word_bert

MAX_LENGTH = 1024
MAX_BATCH = 64
BODY_LIMIT = 256 * 1024
LLAMA, BERT = "tiny-llama", "tiny-bert"


@dataclass
class Models:
    llama: Path
    bert: Path
    cache: Path


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory) -> Models:
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("serve-models")
    return Models(make_chat_llama(root / "llama"), make_word_bert(root / "bert"), root / "cache")


def load_generation(models: Models) -> Any:
    from ember.tools.loading import load_pipeline, pipeline_config

    return load_pipeline(pipeline_config(models.llama, max_length=MAX_LENGTH, max_batch_size=MAX_BATCH,
                                         kv_cache_strategy="paged", cache_dir=models.cache))


def load_embeddings(models: Models) -> Any:
    from ember.runtime.pipelines import PipelineTask
    from ember.tools.loading import load_pipeline, pipeline_config

    return load_pipeline(pipeline_config(models.bert, max_batch_size=32, truncation=False, cache_dir=models.cache),
                         task=PipelineTask.EMBEDDINGS_GENERATION)


@dataclass
class Running:
    """A server running in this process."""

    base_url: str
    models: Any  # ServedModels

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {sample name with labels: value}."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        return {s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}": s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def gauge(self, name: str) -> float:
        """The value of one metric of the text model (its only series)."""
        matches = [v for k, v in self.metrics().items() if k.startswith(name + "{") and LLAMA in k]
        assert len(matches) == 1, (name, matches)
        return matches[0]

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Until no request runs or waits and no KV cache page is held (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            busy = (self.gauge("ember_requests_running"), self.gauge("ember_requests_waiting"),
                    self.gauge("ember_kv_cache_pages_used"))
            if busy == (0, 0, 0):
                return
            assert time.monotonic() < deadline, f"not idle after {timeout} s: running, waiting, pages = {busy}"
            time.sleep(0.05)


@pytest.fixture(scope="session")
def server(serve_models):
    from ember.runtime.serve import ServedEmbedder, ServedGenerator, ServedModels, ServerSettings, create_app
    from ember.runtime.serve.background import BackgroundServer

    generation, embeddings = load_generation(serve_models), load_embeddings(serve_models)
    models = ServedModels(ServedGenerator(LLAMA, generation.pipeline, generation.tokenizer),
                          ServedEmbedder(BERT, embeddings.pipeline), ServerSettings(max_body_bytes=BODY_LIMIT))
    with BackgroundServer(create_app(models)) as background:
        yield Running(background.base_url, models)


@pytest.fixture(scope="session")
def reference(serve_models):
    """Separately loaded pipelines (same artifacts) for expected values: ``(generation, embeddings)``."""
    return load_generation(serve_models), load_embeddings(serve_models)


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def async_client(server):
    openai = pytest.importorskip("openai")
    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
