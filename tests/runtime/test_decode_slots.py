"""Decode slots (issue 15, point 1): a paged pipeline decodes sequences that hold a slot on the continuous graph
(GroupQueryAttention over a slot in place), the pages staying the truth, on a real tiny Llama through onnxruntime:

- step by step (its prompt, then decode steps), the logits of a lone sequence run in a slot equal the paged
  graph's within 1e-5 relative, and the steps really ran in the slot;
- requests of different lengths in one batch (paged steps while several decode, the slot once one is left, rows
  moving between the two) give the tokens of the paged pipeline without slots; afterwards a prompt that extends a
  finished one reads its pages from the prefix cache (written back from the slot) and gives the same tokens too;
- the mirror's invariant (each sequence's slot or pages hold all its tokens, equal where both do) holds after every
  step; releasing a request (finished, aborted, preempted under a pool too small for all) frees its slot and its
  pages, and preempted requests resume with the tokens of a pipeline without slots;
- what decode slots cannot serve is refused when the configuration is made (speculative decoding, an int8 or a
  continuous cache, tensor parallelism), or when the model is a compiled artifact without the slots' graph; one
  with it serves with or without slots, on one onnxruntime session.
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.runtime.compile_cache import compile_options
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, SamplingParams
from ember.runtime.pipelines.model_source import ModelSource
from ember.runtime.pipelines.context import TextContext

from ..reference.tiny_models import make_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(20, 33)), [40, 41, 42]]
NEW_TOKENS = [6, 19, 11]  # rows finish at different steps: the last one decodes alone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny-slots")
    make_model("llama-gqa-llama3", model)
    return model, tmp_path_factory.mktemp("cache")


def load(tiny, **kwargs):
    model, cache = tiny
    config = PipelineConfig(model_path=model, cache_dir=cache, kv_cache_strategy="paged", max_length=64,
                            kv_cache_page_size=4, max_batch_size=4, **kwargs)
    return PIPELINE_REGISTRY.retrieve(config)[1]


@pytest.fixture(scope="module")
def plain(tiny):
    return load(tiny, decode_slots=0)


@pytest.fixture(scope="module")
def slotted(tiny):
    return load(tiny, decode_slots=1)


def check(pipeline) -> None:
    model = pipeline.pipeline_model
    model.kv_manager.check_invariants()
    if model.decode_slots is not None:
        model.decode_slots.mirror.check_invariants()


def test_a_lone_sequence_decodes_in_its_slot_with_the_paged_logits(plain, slotted):
    models = [plain.pipeline_model, slotted.pipeline_model]
    contexts = [TextContext(list(PROMPTS[1]), max_length=64, request_id=f"step-{i}") for i in range(2)]
    before = slotted.pipeline_model.decode_slots.steps
    try:
        inputs = [m.prepare_initial_token_inputs([c]) for m, c in zip(models, contexts)]
        for step in range(12):
            logits = [m.execute(i).next_token_logits for m, i in zip(models, inputs)]
            np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5 * np.abs(logits[0]).max())
            token = int(np.argmax(logits[0][0]))
            for ctx in contexts:
                ctx.start_idx = ctx.active_idx
                ctx.append(token)
            inputs = [m.prepare_next_token_inputs(np.array([token]), i) for m, i in zip(models, inputs)]
            check(slotted)
    finally:
        for model, ctx in zip(models, contexts):
            model.release(ctx.request_id)
    assert slotted.pipeline_model.decode_slots.steps - before == 12  # the prompt too: a lone request runs in its slot
    check(slotted)
    assert slotted.pipeline_model.kv_manager.num_active == 0
    assert slotted.pipeline_model.decode_slots.mirror.slots.num_active == 0


def run(pipeline, prompts, new_tokens, preempted: list | None = None) -> list[list[int]]:
    contexts = [pipeline.new_context(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
                for p, n in zip(prompts, new_tokens)]
    on_step = None if preempted is None else (lambda decision: preempted.extend(decision.preempted))
    for _ in pipeline.generate(contexts, on_step=on_step):
        check(pipeline)
    return [c.generated for c in contexts]


def test_rows_move_between_pages_and_slot_and_give_the_paged_tokens(plain, slotted):
    before = slotted.pipeline_model.decode_slots.steps
    expected = run(plain, PROMPTS, NEW_TOKENS)
    assert run(slotted, PROMPTS, NEW_TOKENS) == expected
    assert slotted.pipeline_model.decode_slots.steps - before >= NEW_TOKENS[1] - NEW_TOKENS[2] - 1  # the lone tail
    # The longest request's tokens decoded in the slot reached its pages: a prompt extending it is served from the
    # prefix cache (whole pages) and continues exactly as without slots.
    follow_up = [PROMPTS[1] + expected[1] + [3]]
    cached = slotted.pipeline_model.kv_manager.prompt_tokens_cached
    assert run(slotted, follow_up, [8]) == run(plain, follow_up, [8])
    assert slotted.pipeline_model.kv_manager.prompt_tokens_cached - cached >= 16
    assert slotted.pipeline_model.kv_manager.num_active == 0


def test_two_slots_decode_two_rows_together(tiny, plain):
    two = load(tiny, decode_slots=2)
    expected = run(plain, PROMPTS[:2], NEW_TOKENS[:2])
    assert run(two, PROMPTS[:2], NEW_TOKENS[:2]) == expected
    assert two.pipeline_model.decode_slots.steps >= NEW_TOKENS[0] - 1


@pytest.mark.parametrize("options,message", [
    (dict(speculative="ngram"), "plain decoding"),
    (dict(kv_cache_bit_width=8), "float KV cache"),
    (dict(kv_cache_strategy="continuous"), "paged KV cache"),
    (dict(tensor_parallel=2), "one process"),
    (dict(decode_slots=-1), "decode_slots must be"),
])
def test_what_slots_cannot_serve_is_refused_in_the_configuration(options, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(model_path="unused", **{"decode_slots": 1, **options})


def test_a_compiled_artifact_gets_slots_only_if_it_holds_their_graph(tiny, plain, slotted):
    artifact = plain.pipeline_model.artifact.path
    with pytest.raises(ValueError, match="pass the source model"):
        PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=artifact, decode_slots=1, max_length=64))
    artifact = slotted.pipeline_model.artifact.path
    for slots in (1, 0):  # its paged graph alone, too
        loaded = PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=artifact, decode_slots=slots, max_length=64,
                                                           max_batch_size=4))[1]
        assert run(loaded, PROMPTS[:1], NEW_TOKENS[:1]) == run(plain, PROMPTS[:1], NEW_TOKENS[:1])
        assert (loaded.pipeline_model.decode_slots is not None) == bool(slots)


@pytest.mark.parametrize("options, slots", [
    (dict(kv_cache_strategy="paged"), 1),
    (dict(kv_cache_strategy="paged", device="cpu:0"), 1),
    (dict(), 0),  # the strategy left to the encoding: not known to be paged here
    (dict(kv_cache_strategy="continuous"), 0),
    (dict(speculative="ngram"), 0),
    (dict(kv_cache_strategy="paged", kv_cache_bit_width=8), 0),
    (dict(kv_cache_strategy="paged", tensor_parallel=2), 0),
    (dict(kv_cache_strategy="paged", device="cuda"), 0),
])
def test_decode_slots_none_turns_them_on_where_they_can_serve(options, slots):
    config = PipelineConfig(model_path="unused", decode_slots=None, **options)
    assert (config.decode_slots, config.decode_slots_auto) == (slots, True)


def test_automatic_slots_stay_off_on_cpus_they_are_not_verified_on(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert PipelineConfig(model_path="unused", kv_cache_strategy="paged").decode_slots == 0
    assert PipelineConfig(model_path="unused", kv_cache_strategy="paged", decode_slots=1).decode_slots == 1


def test_the_default_is_automatic_and_the_compile_keeps_slots_where_the_target_runs_them(tiny):
    assert PipelineConfig().decode_slots_auto
    model, _ = tiny
    source = ModelSource.resolve(model)
    architecture = PIPELINE_REGISTRY.architecture_for(source)
    for target, slot_graph in (("ort-cpu", True), ("ort-cpu-qdq", False), ("ort-cuda", False), ("tensorrt", False)):
        config = PipelineConfig(model_path=model, kv_cache_strategy="paged", target=target)
        assert compile_options(config, architecture, source).slot_graph is slot_graph
    with pytest.raises(ValueError, match="CPU provider"):  # asked for: refused, not dropped
        compile_options(PipelineConfig(model_path=model, kv_cache_strategy="paged", target="ort-cuda",
                                       decode_slots=1), architecture, source)


def test_automatic_slots_serve_an_artifact_without_their_graph_without_them(tiny, plain):
    artifact = plain.pipeline_model.artifact.path
    loaded = PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=artifact, decode_slots=None, max_length=64,
                                                       kv_cache_strategy="paged", max_batch_size=4))[1]
    assert loaded.pipeline_model.decode_slots is None
    assert run(loaded, PROMPTS[:1], NEW_TOKENS[:1]) == run(plain, PROMPTS[:1], NEW_TOKENS[:1])


def test_the_slots_share_the_paged_models_session(slotted):
    """One onnxruntime session: the slots' decoder is a second binding of the paged decoder's loaded model."""
    model = slotted.pipeline_model
    assert model.decode_slots.model.model.session is model.model.session


def test_a_request_stopped_mid_decode_frees_its_slot_and_pages(slotted):
    """Leaving ``generate`` early aborts the request (as a disconnected client does): its slot's tokens go back to its
    pages before they are released, and a prompt repeating them is then served from the prefix cache."""
    model = slotted.pipeline_model
    context = slotted.new_context(PROMPTS[1], SamplingParams(max_new_tokens=30, ignore_eos=True))
    for i, _ in enumerate(slotted.generate([context])):
        if i == 9:
            break
    check(slotted)
    assert model.kv_manager.num_active == 0 and model.decode_slots.mirror.slots.num_active == 0
    assert model.kv_manager.pool.num_referenced == 0
    cached = model.kv_manager.match_prefix(PROMPTS[1] + context.generated + [3])
    assert cached >= 16  # whole pages of the prompt and the tokens decoded in the slot


def test_preemption_under_a_small_pool_gives_the_same_tokens(tiny):
    """Pages run out while rows move between pages and slot: preempted requests are recomputed from their pages (those
    of tokens decoded in the slot were written back first) and every request gets the tokens of a pipeline without
    slots under the same pool."""
    small = dict(kv_cache_pages=16, enable_prefix_caching=True)  # 64 tokens: one max-length sequence
    plain_small, slotted_small = load(tiny, **small), load(tiny, decode_slots=1, **small)
    prompts, new_tokens = PROMPTS + [list(range(60, 66))], [20, 30, 25, 20]
    expected = run(plain_small, prompts, new_tokens)
    preempted: list[str] = []
    assert run(slotted_small, prompts, new_tokens, preempted) == expected
    assert preempted and slotted_small.pipeline_model.decode_slots.steps > 0
    assert slotted_small.pipeline_model.kv_manager.num_active == 0
