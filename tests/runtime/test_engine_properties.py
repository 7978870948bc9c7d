"""Property test of the serving engine at its API boundary (issue 17): random sequences of new requests (request
ids that may repeat a live one, prompts whose token ids may be negative or outside the vocabulary), cancellations
and steps, on a paged cache small enough to preempt and a continuous one. Bad requests are refused with a
ValueError and take nothing; after every operation the page pool's invariants hold; at the end every request has
finished or been cancelled and no slot or page is held."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.runtime.engine import LLMEngine
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, SamplingParams
from ember.runtime.scheduler import SchedulerConfig

from ..reference.tiny_models import VOCAB, make_model

token = st.one_of(st.integers(1, VOCAB - 1), st.sampled_from([-1, VOCAB, VOCAB + 7]))
operation = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(["a", "b", "c", "d", "e"]),
              st.lists(token, min_size=1, max_size=40), st.integers(1, 8)),
    st.tuples(st.just("abort"), st.sampled_from(["a", "b", "c", "d", "e", "never"])),
    st.tuples(st.just("step"), st.integers(1, 3)),
)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-engine-properties")
    make_model("llama-gqa-llama3", directory)
    cache = tmp_path_factory.mktemp("cache")

    def load(strategy: str, **kwargs):
        config = PipelineConfig(model_path=directory, cache_dir=cache, kv_cache_strategy=strategy, max_length=64,
                                kv_cache_page_size=4, **kwargs)
        return PIPELINE_REGISTRY.retrieve(config)[1]

    return {"paged": load("paged", max_batch_size=4, kv_cache_pages=24), "continuous": load("continuous",
                                                                                              max_batch_size=3)}


def check(pipeline) -> None:
    manager = pipeline.pipeline_model.kv_manager
    if hasattr(manager, "check_invariants"):
        manager.check_invariants()


@pytest.mark.parametrize("strategy", ["paged", "continuous"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=st.lists(operation, max_size=25))
def test_random_requests_cancels_and_steps_leak_nothing(pipelines, strategy, operations):
    pipeline = pipelines[strategy]
    engine = LLMEngine(pipeline, SchedulerConfig(max_num_batched_tokens=24))
    live: set[str] = set()
    for op in operations:
        if op[0] == "add":
            _, request_id, prompt, new_tokens = op
            bad = any(not 0 <= t < VOCAB for t in prompt) or request_id in live
            try:
                engine.add_request(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), request_id)
            except ValueError:
                assert bad, "a good request was refused"
            else:
                assert not bad, "a bad request was accepted"
                live.add(request_id)
        elif op[0] == "abort":
            assert engine.abort_request(op[1]) == (op[1] in live)
            live.discard(op[1])
        else:
            for _ in range(op[1]):
                for output in engine.step():
                    if output.finished:
                        live.discard(output.request_id)
        check(pipeline)
    for output in engine.stream():
        assert output.error is None
        if output.finished:
            live.discard(output.request_id)
    check(pipeline)
    assert live == set() and not engine.has_unfinished_requests()
    manager = pipeline.pipeline_model.kv_manager
    assert manager.num_active == 0
    if strategy == "paged":
        assert manager.free_pages == manager.pool.num_usable
    else:
        assert manager.free_slots == manager.max_batch_size
