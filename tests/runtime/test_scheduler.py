"""Continuous batching: outputs do not depend on scheduling.

Twelve requests (different prompts, three sharing a 40-token prefix, different lengths, arriving at
different steps) run through the engine with a small token budget; each request's greedy tokens must
be exactly what it produces alone. Chunked prefill on and off; cancelling frees the cache at once.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ember.runtime.engine import AsyncLLMEngine, LLMEngine
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, SamplingParams
from ember.runtime.scheduler import SchedulerConfig

from ..reference.tiny_models import VOCAB, make_model

rng = np.random.default_rng(11)
SHARED = [1] + rng.integers(4, VOCAB, 40).tolist()
PROMPTS = ([SHARED + rng.integers(4, VOCAB, n).tolist() for n in (3, 9, 1)]
           + [[1] + rng.integers(4, VOCAB, n).tolist() for n in (2, 30, 7, 55, 4, 12, 1, 20, 3)])
NEW_TOKENS = [8, 5, 12, 3, 10, 7, 6, 9, 4, 11, 2, 8]
ARRIVALS = [0, 0, 1, 1, 2, 3, 3, 5, 6, 8, 8, 10]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama-sched")
    make_model("llama-gqa-llama3", directory)
    return directory


def load(model_dir, cache, strategy="continuous", **kwargs):
    config = PipelineConfig(model_path=model_dir, cache_dir=cache, kv_cache_strategy=strategy, kv_cache_page_size=8,
                            **{"max_batch_size": 4, "max_length": 256, **kwargs})
    return PIPELINE_REGISTRY.retrieve(config)[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def pipeline(model_dir, cache):
    return load(model_dir, cache)


@pytest.fixture(scope="module")
def paged(model_dir, cache):
    return load(model_dir, cache, "paged")


@pytest.fixture(scope="module")
def alone(pipeline):
    return [pipeline.generate_tokens([p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
            for p, n in zip(PROMPTS, NEW_TOKENS)]


def run_with_arrivals(engine: LLMEngine) -> list[list[int]]:
    ids, outputs, step = {}, {}, 0
    while len(ids) < len(PROMPTS) or engine.has_unfinished_requests():
        for i, arrival in enumerate(ARRIVALS):
            if arrival == step:
                ids[i] = engine.add_request(PROMPTS[i], SamplingParams(max_new_tokens=NEW_TOKENS[i], ignore_eos=True))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out.token)
        step += 1
    return [outputs[ids[i]] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("strategy", ["continuous", "paged"])
@pytest.mark.parametrize("chunked", [True, False])
def test_outputs_do_not_depend_on_scheduling(pipeline, paged, alone, chunked, strategy):
    pipe = paged if strategy == "paged" else pipeline
    engine = LLMEngine(pipe, SchedulerConfig(max_num_batched_tokens=16, enable_chunked_prefill=chunked))
    assert run_with_arrivals(engine) == alone
    stats = engine.scheduler.stats
    assert max(stats.batch_sizes) > 1  # requests really ran together
    if chunked:
        assert stats.prompt_chunks > 0  # prompts longer than the budget were split
    assert pipe.pipeline_model.kv_manager.num_active == 0


def test_paged_pool_too_small_preempts_instead_of_failing(model_dir, cache, alone):
    """10 pages of 8 tokens for 4 running requests of up to 67 tokens: someone must give pages back."""
    small = load(model_dir, cache, "paged", kv_cache_pages=10, max_length=80, enable_prefix_caching=False)
    engine = LLMEngine(small, SchedulerConfig(max_num_batched_tokens=32))
    assert run_with_arrivals(engine) == alone
    assert engine.scheduler.stats.preemptions > 0
    manager = small.pipeline_model.kv_manager
    assert manager.num_active == 0 and manager.free_pages == manager.pool.num_usable
    manager.check_invariants()


def test_prefix_cache_computes_only_the_suffix(model_dir, cache):
    prefix = [1] + np.random.default_rng(3).integers(4, VOCAB, 199).tolist()  # 200 tokens, 25 pages of 8
    first, second = prefix + [10, 11, 12], prefix + [20, 21, 22, 23]
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True)
    cold = load(model_dir, cache, "paged", enable_prefix_caching=False)
    expected = [cold.generate_tokens([p], sampling)[0] for p in (first, second)]

    warm = load(model_dir, cache, "paged")
    manager = warm.pipeline_model.kv_manager
    assert warm.generate_tokens([first], sampling)[0] == expected[0]
    before = (manager.prompt_tokens_requested, manager.prompt_tokens_cached)
    engine = LLMEngine(warm)
    engine.add_request(second, sampling)
    scheduled, tokens = [], []
    while engine.has_unfinished_requests():
        output = engine.scheduler.schedule()
        scheduled.append(output.num_scheduled_tokens)
        tokens += [o.token for o in engine.scheduler.update(output, engine.runner.execute(output.rows))]
    assert manager.prompt_tokens_requested - before[0] == len(second)
    assert manager.prompt_tokens_cached - before[1] == 200  # all 25 full shared pages
    assert scheduled[0] == len(second) - 200  # the first step computes only the suffix
    assert tokens == expected[1]
    assert engine.scheduler.requests == {} and manager.num_active == 0


def test_decodes_keep_running_while_a_long_prompt_is_chunked(pipeline):
    engine = LLMEngine(pipeline, SchedulerConfig(max_num_batched_tokens=8))
    short = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=12, ignore_eos=True))
    engine.step()  # the short prompt is prefilled and starts decoding
    long = engine.add_request(PROMPTS[6], SamplingParams(max_new_tokens=2, ignore_eos=True))  # 56 tokens
    produced = []
    for _ in range(6):  # the long prompt needs 7 steps of 7 tokens next to the decode
        produced.append({o.request_id for o in engine.step()})
    assert all(short in p for p in produced) and not any(long in p for p in produced)
    list(engine.stream())


@pytest.mark.parametrize("strategy", ["continuous", "paged"])
def test_cancelling_frees_the_cache_at_once(pipeline, paged, strategy):
    pipeline = paged if strategy == "paged" else pipeline
    engine = LLMEngine(pipeline)
    kept = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=6, ignore_eos=True))
    dropped = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.step()
    manager = pipeline.pipeline_model.kv_manager
    assert manager.num_active == 2
    assert engine.abort_request(dropped) and manager.num_active == 1
    assert not engine.abort_request(dropped)
    outputs = [o for o in engine.stream()]
    assert {o.request_id for o in outputs} == {kept} and manager.num_active == 0
    if strategy == "paged":  # every page is free again (or cached for a later prefix hit)
        assert manager.free_pages == manager.pool.num_usable
        manager.check_invariants()


def test_async_engine_streams_and_cancels(pipeline, alone):
    async def main():
        engine = AsyncLLMEngine(LLMEngine(pipeline))

        async def collect(i):
            return [o.token async for o in engine.generate(PROMPTS[i], SamplingParams(max_new_tokens=NEW_TOKENS[i],
                                                                                      ignore_eos=True))]

        async def cancel_early():
            stream = engine.generate(PROMPTS[4], SamplingParams(max_new_tokens=100, ignore_eos=True))
            first = await stream.__anext__()
            await stream.aclose()
            return first

        results = await asyncio.gather(collect(0), collect(5), cancel_early(), collect(9))
        engine.shutdown()
        return results

    a, b, first, c = asyncio.run(main())
    assert (a, b, c) == (alone[0], alone[5], alone[9]) and first.token is not None
    assert pipeline.pipeline_model.kv_manager.num_active == 0


@pytest.mark.parametrize("strategy", ["continuous", "paged"])
def test_next_token_multi_step_on_both_strategies(pipeline, paged, alone, strategy):
    """MAX's step API: a batch of prompts, then several decode steps per call, on either KV cache."""
    pipe = paged if strategy == "paged" else pipeline
    contexts = {c.request_id: c for c in (pipe.new_context(PROMPTS[i], SamplingParams(max_new_tokens=NEW_TOKENS[i],
                                                                                      ignore_eos=True))
                                          for i in (0, 4, 9))}
    while any(not c.is_done for c in contexts.values()):
        pipe.next_token(contexts, num_steps=4)
    for ctx in contexts.values():
        pipe.release(ctx)
    assert [c.generated for c in contexts.values()] == [alone[0], alone[4], alone[9]]
    assert pipe.pipeline_model.kv_manager.num_active == 0
