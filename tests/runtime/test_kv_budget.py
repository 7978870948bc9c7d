"""The KV cache budget bounds the maximum length (issue 17): a model whose own limit does not fit the budget
(``--kv-cache-bytes``, or half the available memory) runs with the length that fits, said in a warning; a length
the user asked for that does not fit, or a budget that holds nothing, is an error naming the option."""
from __future__ import annotations

import logging

import pytest

from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, SamplingParams

from ..reference.tiny_models import make_model

BYTES_PER_TOKEN = 2 * 3 * 2 * 32 * 4  # K and V, 3 layers, 2 KV heads, head_dim 32, float32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-kv-budget")
    make_model("llama-gqa-llama3", directory)  # max_position_embeddings 256
    return directory


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def load(model_dir, cache, **kwargs):
    return PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=model_dir, cache_dir=cache, max_batch_size=1,
                                                     **kwargs))[1]


def test_continuous_length_is_capped_to_the_budget_and_said(model_dir, cache, caplog):
    with caplog.at_level(logging.WARNING):
        pipeline = load(model_dir, cache, kv_cache_bytes=100 * BYTES_PER_TOKEN)
    assert pipeline.max_length == 100
    assert pipeline.pipeline_model.kv_manager.nbytes <= 100 * BYTES_PER_TOKEN
    assert "max_length capped to 100 tokens (the model allows 256)" in caplog.text
    assert len(pipeline.generate_tokens([[1, 5, 6]], SamplingParams(max_new_tokens=200, ignore_eos=True))[0]) == 97


def test_paged_length_is_capped_to_whole_pages_of_the_budget(model_dir, cache):
    page = 4 * BYTES_PER_TOKEN
    pipeline = load(model_dir, cache, kv_cache_strategy="paged", kv_cache_page_size=4, kv_cache_bytes=6 * page)
    assert pipeline.max_length == 20  # 6 pages, one of them the scratch page


@pytest.mark.parametrize("kwargs,message", [
    ({"kv_cache_bytes": 100 * BYTES_PER_TOKEN, "max_length": 200}, "holds 100 tokens of one sequence, less than "
                                                                    "max_length 200; raise --kv-cache-bytes"),
    ({"kv_cache_bytes": 1}, "holds 0 tokens of one sequence"),
])
def test_a_budget_that_cannot_hold_the_asked_length_is_an_error(model_dir, cache, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load(model_dir, cache, **kwargs)
