"""The one stepping path (model runner) and the MAX step API around it.

``next_token``, ``generate`` and the engine all step through ``ModelRunner.execute``: they must give the same
tokens. Log probabilities of the prompt (OpenAI's ``echo``) come two ways, from an artifact that returns every
position's logits (``compute_log_probabilities(..., batch_echo=[True])``) and from any artifact one position per
step (``SamplingParams.prompt_logprobs``); both must equal transformers' log_softmax on the same weights.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from ember.runtime.engine import AsyncLLMEngine, LLMEngine
from ember.runtime.pipelines import (PIPELINE_REGISTRY, ModelInputs, PipelineConfig, ReturnLogits, SamplingParams)
from ember.runtime.pipelines.decoder_inputs import DecoderInputs
from ember.runtime.pipelines.kv_binding import ContinuousKVInputs, PagedKVInputs
from ember.runtime.scheduler import SchedulerOutput, StepOutput

from ..reference.tiny_models import VOCAB, make_model

PROMPT = [1] + np.random.default_rng(5).integers(4, VOCAB, 17).tolist()
OTHER = [1] + np.random.default_rng(6).integers(4, VOCAB, 9).tolist()
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-stepping")
    return directory, make_model("llama-gqa-llama3", directory)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stepping-cache")


def load(tiny, cache, **kwargs):
    config = PipelineConfig(model_path=tiny[0], cache_dir=cache, max_batch_size=4, max_length=128,
                            kv_cache_page_size=8, **kwargs)
    return PIPELINE_REGISTRY.retrieve(config)[1]


def reference_prompt_logprobs(hf_model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1).numpy()
    return np.array([logp[i - 1, tokens[i]] for i in range(1, len(tokens))])


def test_model_inputs_subclass_setting_attributes_in_init_iterates_them_in_order():
    class Inputs(ModelInputs):  # MAX's own example: not a dataclass, attributes set in __init__
        def __init__(self, tokens, input_row_offsets, kv_cache_inputs=None):
            self.tokens = tokens
            self.input_row_offsets = input_row_offsets
            self.kv_cache_inputs = kv_cache_inputs

    tokens, offsets = np.arange(5), np.array([0, 2, 5])
    inputs = Inputs(tokens, offsets, kv_cache_inputs=(np.zeros(2), np.zeros(2)))
    assert [id(x) for x in inputs] == [id(tokens), id(offsets)]


@pytest.mark.parametrize("strategy", ["continuous", "paged"])
def test_next_token_generate_and_engine_agree(tiny, cache, strategy):
    pipe = load(tiny, cache, kv_cache_strategy=strategy)
    expected = pipe.generate_tokens([PROMPT, OTHER], GREEDY)
    contexts = {c.request_id: c for c in (pipe.new_context(PROMPT, GREEDY), pipe.new_context(OTHER, GREEDY))}
    tokens: dict[str, list[int]] = {r: [] for r in contexts}
    while not all(c.is_done for c in contexts.values()):
        for step in pipe.next_token(contexts, num_steps=4):
            for request_id, response in step.items():
                tokens[request_id].append(response.token)
    for ctx in contexts.values():
        pipe.release(ctx)
    assert list(tokens.values()) == expected
    assert LLMEngine(pipe).generate([PROMPT, OTHER], GREEDY) == expected
    assert pipe.pipeline_model.kv_manager.num_active == 0


@pytest.mark.parametrize("strategy,kv_type", [("continuous", ContinuousKVInputs), ("paged", PagedKVInputs)])
def test_prepare_batch_returns_typed_kv_inputs(tiny, cache, strategy, kv_type):
    pipe = load(tiny, cache, kv_cache_strategy=strategy)
    ctx = pipe.new_context(PROMPT, GREEDY)
    inputs, kv_inputs, num_steps = pipe.prepare_batch([ctx], 100)
    try:
        assert isinstance(kv_inputs, kv_type) and kv_inputs is inputs.kv_cache_inputs
        assert num_steps == GREEDY.max_new_tokens
        assert [a.shape for a in inputs] == [(1, len(PROMPT)), (1,), (1,)]  # tokens, input and cache lengths
    finally:
        pipe.release(ctx)


def test_echo_from_every_position_logits_matches_transformers(tiny, cache):
    pipe = load(tiny, cache, return_logits=ReturnLogits.ALL)
    model = pipe.pipeline_model
    ctx = pipe.new_context(PROMPT, GREEDY)
    try:
        inputs = model.prepare_initial_token_inputs([ctx])
        outputs = model.execute(inputs)
        token = int(np.argmax(outputs.next_token_logits[0]))
        (result,) = model.compute_log_probabilities(inputs, outputs, np.array([token]), [3], [True])
    finally:
        pipe.release(ctx)
    prompt = result["prompt"]
    assert prompt[0] is None and len(prompt) == len(PROMPT)
    ours = np.array([p["token_log_probability"] for p in prompt[1:]])
    np.testing.assert_allclose(ours, reference_prompt_logprobs(tiny[1], PROMPT), rtol=1e-4, atol=1e-5)
    assert all(len(p["top"]) == 3 for p in prompt[1:])


def test_echo_without_every_position_logits_is_a_clear_error(tiny, cache):
    pipe = load(tiny, cache)
    model = pipe.pipeline_model
    ctx = pipe.new_context(PROMPT, GREEDY)
    try:
        inputs = model.prepare_initial_token_inputs([ctx])
        outputs = model.execute(inputs)
        with pytest.raises(ValueError, match="return_logits=ALL"):
            model.compute_log_probabilities(inputs, outputs, np.array([0]), [0], [True])
    finally:
        pipe.release(ctx)


@pytest.mark.parametrize("strategy", ["continuous", "paged"])
def test_prompt_logprobs_on_any_artifact_match_transformers(tiny, cache, strategy):
    pipe = load(tiny, cache, kv_cache_strategy=strategy)
    pipe.generate_tokens([PROMPT], GREEDY)  # the paged cache now holds PROMPT's full pages: they must not be reused
    prompt = pipe.prompt_log_probabilities(PROMPT, top_n=2)
    assert prompt[0] is None and len(prompt) == len(PROMPT)
    ours = np.array([p["token_log_probability"] for p in prompt[1:]])
    np.testing.assert_allclose(ours, reference_prompt_logprobs(tiny[1], PROMPT), rtol=1e-4, atol=1e-5)

    # Through the engine, next to another request: the first output carries them, the tokens are unchanged.
    engine = LLMEngine(pipe)
    echo = engine.add_request(PROMPT, SamplingParams(max_new_tokens=6, ignore_eos=True, prompt_logprobs=0))
    other = engine.add_request(OTHER, GREEDY)
    outputs: dict[str, list[StepOutput]] = {}
    for out in engine.stream():
        outputs.setdefault(out.request_id, []).append(out)
    first = outputs[echo][0]
    assert [p["token_log_probability"] for p in first.prompt_log_probabilities[1:]] == pytest.approx(ours, rel=1e-6)
    assert all(o.prompt_log_probabilities is None for o in outputs[echo][1:] + outputs[other])
    assert [o.token for o in outputs[echo]] == pipe.generate_tokens([PROMPT], GREEDY)[0]
    assert pipe.pipeline_model.kv_manager.num_active == 0


def test_scheduler_output_is_plain_data(tiny, cache):
    pipe = load(tiny, cache, kv_cache_strategy="paged")
    engine = LLMEngine(pipe)
    request_id = engine.add_request(PROMPT, GREEDY)
    output = engine.scheduler.schedule()
    assert isinstance(output, SchedulerOutput) and output.preempted == ()
    (row,) = output.scheduled
    assert (row.request_id, row.num_tokens) == (request_id, len(PROMPT))
    assert output.num_scheduled_tokens == len(PROMPT)
    results = engine.runner.execute(output.rows)
    (step,) = engine.scheduler.update(output, results)
    assert step.request_id == request_id and step.error is None and not step.finished
    engine.abort_request(request_id)


def test_a_failing_step_reaches_every_stream_as_an_error(tiny, cache):
    pipe = load(tiny, cache)
    engine = LLMEngine(pipe)

    def broken(rows):
        raise RuntimeError("device lost")

    async def run() -> StepOutput:
        async_engine = AsyncLLMEngine(engine)
        try:
            return [o async for o in async_engine.generate(PROMPT, GREEDY)][-1]
        finally:
            async_engine.shutdown()

    engine.runner.execute = broken  # the model failing mid-serving (a real error, raised where the model runs)
    try:
        last = asyncio.run(run())
    finally:
        del engine.runner.execute
    assert last.finished and last.finish_reason is None and last.token is None
    assert last.error == "RuntimeError: device lost"
    assert not engine.has_unfinished_requests() and pipe.pipeline_model.kv_manager.num_active == 0


def test_bad_requests_are_refused_before_they_reach_the_model(tiny, cache):
    pipe = load(tiny, cache)
    vocab = pipe.pipeline_model.vocab_size
    for bad in (-1, vocab, 2**40):
        with pytest.raises(ValueError, match=f"token {bad} is not a token id of this model"):
            pipe.new_context([1, bad, 2])
    ctx = pipe.new_context(PROMPT, GREEDY)
    with pytest.raises(ValueError, match="num_steps must be at least 1"):
        pipe.next_token({ctx.request_id: ctx}, num_steps=0)
    assert pipe.pipeline_model.kv_manager.num_active == 0


@pytest.mark.parametrize("strategy", ["continuous", "paged"])
def test_a_call_of_no_rows_is_refused_before_the_kernels(tiny, cache, strategy):
    """GroupQueryAttention dies with SIGFPE on a batch of 0 rows: no such call may reach onnxruntime."""
    model = load(tiny, cache, kv_cache_strategy=strategy).pipeline_model
    empty = DecoderInputs(tokens=np.zeros((0, 1), np.int64), input_lengths=np.zeros(0, np.int32),
                          cache_lengths=np.zeros(0, np.int32))
    for call in (lambda: model.prepare_initial_token_inputs([]), lambda: model.execute(empty)):
        with pytest.raises(ValueError, match="at least one row"):
            call()


@pytest.mark.parametrize("strategy", ["continuous", "paged"])
def test_next_token_on_more_requests_than_the_cache_holds_claims_nothing(tiny, cache, strategy):
    from ember.runtime.kv_cache import KVCacheExhausted

    pipe = load(tiny, cache, kv_cache_strategy=strategy)  # max_batch_size 4
    contexts = {c.request_id: c for c in (pipe.new_context(PROMPT, GREEDY) for _ in range(5))}
    with pytest.raises(KVCacheExhausted, match="a batch of 5 requests does not fit"):
        pipe.next_token(contexts)
    assert pipe.pipeline_model.kv_manager.num_active == 0
    assert all(c.start_idx == 0 and not c.generated for c in contexts.values())
    first_four = dict(list(contexts.items())[:4])  # the same contexts still run
    assert len(pipe.next_token(first_four)[0]) == 4
    for ctx in first_four.values():
        pipe.release(ctx)


@pytest.mark.parametrize("strategy", ["continuous", "paged"])
def test_a_new_request_under_a_live_id_is_refused(tiny, cache, strategy):
    pipe = load(tiny, cache, kv_cache_strategy=strategy)
    first = pipe.new_context(PROMPT, GREEDY, request_id="same")
    pipe.next_token({"same": first})
    impostor = pipe.new_context(OTHER, GREEDY, request_id="same")
    with pytest.raises(ValueError, match="'same' is already in use"):
        pipe.next_token({"same": impostor})
    engine = LLMEngine(pipe)
    engine.add_request(OTHER, GREEDY, request_id="queued")
    with pytest.raises(ValueError, match="already scheduled"):
        engine.add_request(OTHER, GREEDY, request_id="queued")
    engine.abort_request("queued")
    pipe.release(first)
    assert pipe.pipeline_model.kv_manager.num_active == 0


@pytest.mark.parametrize("field,value,message", [
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("temperature", float("inf"), "temperature must be a finite number"),
    ("temperature", -0.5, "temperature must be a finite number"),
    ("top_p", float("nan"), "top_p must be in"),
    ("seed", -1, "seed must be an integer from 0"),
    ("seed", 2**64, "seed must be an integer from 0"),
    ("repetition_penalty", float("nan"), "repetition_penalty must be > 0"),
    ("repetition_penalty", float("inf"), "repetition_penalty must be > 0"),
    ("frequency_penalty", float("nan"), "frequency_penalty must be in"),
    ("top_logprobs", -1, "top_logprobs must be >= 0"),
    ("prompt_logprobs", -1, "prompt_logprobs must be >= 0"),
])
def test_sampling_parameters_out_of_range_name_the_parameter(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("strategy", ["continuous", "paged"])
def test_two_contexts_with_one_request_id_in_a_batch_are_refused_leaving_nothing_taken(tiny, cache, strategy):
    """A batch maps request ids to contexts; two contexts under one id must not merge their tokens."""
    pipe = load(tiny, cache, kv_cache_strategy=strategy)
    first, second = pipe.new_context(PROMPT, GREEDY, request_id="twin"), pipe.new_context(OTHER, GREEDY, request_id="twin")
    with pytest.raises(ValueError, match="batch key 'other' is not its context's request id 'twin'"):
        pipe.next_token({"twin": first, "other": second})
    assert pipe.pipeline_model.kv_manager.num_active == 0
    assert first.start_idx == second.start_idx == 0 and not first.generated and not second.generated
