"""``ember serve`` over 2 ranks, through OpenAI's client: the answers of the single-process server, concurrent
requests included (the engine's thread drives rank 0; the other rank follows)."""
from __future__ import annotations

import concurrent.futures

import pytest

pytest.importorskip("torch.distributed", reason="tensor parallelism runs over torch.distributed (the test extra)")
openai = pytest.importorskip("openai")

from tests.runtime.serve.tiny_serving_models import make_chat_llama  # noqa: E402

QUESTIONS = ["hello", "hello user", "system assistant hello", "user user hello"]


def _answers(model, cache, tensor_parallel: int) -> list[str]:
    from ember.runtime.serve import ServedGenerator, ServedModels, ServerSettings, create_app
    from ember.runtime.serve.background import BackgroundServer
    from ember.tools.loading import load_pipeline, pipeline_config

    loaded = load_pipeline(pipeline_config(model, max_length=256, max_batch_size=8, kv_cache_strategy="paged",
                                           cache_dir=cache, tensor_parallel=tensor_parallel, num_threads=1))
    models = ServedModels(ServedGenerator("tiny", loaded.pipeline, loaded.tokenizer), None, ServerSettings())
    try:
        with BackgroundServer(create_app(models)) as server:
            client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)

            def ask(question: str) -> str:
                reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                                       max_tokens=12, temperature=0)
                return reply.choices[0].message.content

            with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
                return list(pool.map(ask, QUESTIONS))
    finally:
        group = getattr(loaded.pipeline.pipeline_model.model, "group", None)
        if group is not None:
            group.close()


def test_two_ranks_serve_the_single_process_answers(tmp_path):
    model = make_chat_llama(tmp_path / "llama")
    assert _answers(model, tmp_path / "cache", 2) == _answers(model, tmp_path / "cache", 1)
