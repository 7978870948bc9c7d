"""Repetition, frequency and presence penalties: the formulas against their references, and generation with
them on both stepping paths (``TextGenerationPipeline.next_token`` and the scheduler / engine) against
transformers.

The repetition penalty is checked against transformers' own ``RepetitionPenaltyLogitsProcessor``.
transformers has no frequency or presence processor (those are OpenAI's / vLLM's), so those two are checked
against a plain numpy transcription of OpenAI's definition, walking the whole history token by token.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from ember.runtime.engine import LLMEngine
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, SamplingParams
from ember.runtime.pipelines.context import TextContext, TokenCounts
from ember.runtime.pipelines.sampling import apply_penalties, sample, sample_contexts

from ..reference.tiny_models import VOCAB, make_model

RNG = np.random.default_rng(0)


def history(prompt_len: int, output_len: int, vocab: int) -> tuple[list[int], list[int]]:
    """A prompt and an output drawn from a small part of the vocabulary, so that tokens repeat."""
    pool = RNG.choice(vocab, size=40, replace=False)
    return [int(t) for t in RNG.choice(pool, prompt_len)], [int(t) for t in RNG.choice(pool, output_len)]


def counts_for(prompt: list[int], output: list[int]) -> TokenCounts:
    counts = TokenCounts(prompt)
    for token in output:
        counts.add_output(token)
    return counts


def openai_penalties(logits: np.ndarray, output: list[int], frequency: float, presence: float) -> np.ndarray:
    """OpenAI's definition, literally: mu[j] - c[j] * frequency - (c[j] > 0) * presence over the output."""
    expected = logits.astype(np.float64).copy()
    for j in range(len(logits)):
        c = sum(1 for token in output if token == j)
        expected[j] -= c * frequency + (1.0 if c > 0 else 0.0) * presence
    return expected


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    vocab = 300
    for _ in range(5):
        prompt, output = history(12, 20, vocab)
        logits = (RNG.standard_normal(vocab) * 4).astype(np.float32)  # both signs, as the rule depends on it
        ours = apply_penalties(logits, SamplingParams(repetition_penalty=penalty), counts_for(prompt, output))
        processor = RepetitionPenaltyLogitsProcessor(penalty)
        reference = processor(torch.tensor([prompt + output]), torch.tensor(logits[None])).numpy()[0]
        np.testing.assert_array_equal(ours, reference)
        assert ours.dtype == logits.dtype
        untouched = np.setdiff1d(np.arange(vocab), prompt + output)
        np.testing.assert_array_equal(ours[untouched], logits[untouched])


@pytest.mark.parametrize("frequency, presence", [(0.7, 0.0), (0.0, 1.5), (-0.4, 0.9), (2.0, -2.0)])
def test_frequency_and_presence_penalties_match_the_openai_definition(frequency, presence):
    vocab = 300
    for _ in range(5):
        prompt, output = history(15, 25, vocab)
        logits = RNG.standard_normal(vocab).astype(np.float32)
        params = SamplingParams(frequency_penalty=frequency, presence_penalty=presence)
        ours = apply_penalties(logits, params, counts_for(prompt, output))
        expected = openai_penalties(logits, output, frequency, presence)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
        prompt_only = sorted(set(prompt) - set(output))  # these penalties read the output only
        np.testing.assert_array_equal(ours[prompt_only], logits[prompt_only])


def test_all_penalties_together_apply_repetition_first():
    vocab = 200
    prompt, output = history(10, 30, vocab)
    logits = (RNG.standard_normal(vocab) * 3).astype(np.float32)
    params = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.4)
    ours = apply_penalties(logits, params, counts_for(prompt, output))
    repeated = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([prompt + output]),
                                                       torch.tensor(logits[None])).numpy()[0]
    np.testing.assert_allclose(ours, openai_penalties(repeated, output, 0.3, 0.4), rtol=0, atol=1e-5)


def test_token_counts_grow_with_distinct_tokens_not_history():
    counts = TokenCounts([5, 5, 7])
    for i in range(20_000):
        counts.add_output(i % 50)  # past the initial capacity, then only repeats
    assert len(counts.ids) == 50  # 5 and 7 are among 0..49
    assert sorted(counts.ids.tolist()) == list(range(50))
    by_id = dict(zip(counts.ids.tolist(), counts.output_counts.tolist()))
    assert by_id[5] == by_id[7] == by_id[49] == 400


def test_penalties_off_cost_nothing_and_change_nothing():
    context = TextContext([1, 2, 3, 3], max_length=32)
    assert context.token_counts is None  # no bookkeeping per token when every penalty is off
    context.append(3)
    assert context.token_counts is None
    logits = RNG.standard_normal((3, 50)).astype(np.float32)
    rngs = [np.random.default_rng(0) for _ in range(3)]
    assert sample(logits, [SamplingParams()] * 3, rngs).tolist() == np.argmax(logits, axis=-1).tolist()


def test_greedy_and_sampled_rows_both_see_the_penalty():
    logits = np.array([[0.0, 5.0, 4.0, 1.0]] * 2, np.float32)
    strong = SamplingParams(presence_penalty=2.0)
    contexts = [TextContext([0, 3], 16, strong), TextContext([0, 3], 16, SamplingParams(presence_penalty=2.0,
                                                                                          temperature=0.01, seed=0))]
    for context in contexts:
        context.append(1)  # token 1 is in the output: 5 - 2 < 4
    assert sample_contexts(logits, contexts).tolist() == [2, 2]
    # repetition covers the prompt too: token 1 in the prompt, 5 / 2 < 4
    context = TextContext([1], 16, SamplingParams(repetition_penalty=2.0))
    assert sample_contexts(logits[:1], [context]).tolist() == [2]


@pytest.mark.parametrize("field, value, message", [
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("repetition_penalty", -1.0, "repetition_penalty must be > 0"),
    ("repetition_penalty", float("nan"), "repetition_penalty must be > 0"),
    ("frequency_penalty", 2.5, r"frequency_penalty must be in \[-2, 2\]"),
    ("presence_penalty", -2.1, r"presence_penalty must be in \[-2, 2\]"),
    ("presence_penalty", float("nan"), r"presence_penalty must be in \[-2, 2\]"),
])
def test_out_of_range_penalties_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


# generation -----------------------------------------------------------------------------------------------
NEW_TOKENS = 24
PROMPT = [1] + [int(t) for t in np.random.default_rng(5).integers(4, VOCAB, 9)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    hf_model = make_model("llama-gqa-llama3", directory)
    hf_model.generation_config.eos_token_id = None  # run the full length, as ignore_eos does
    config = PipelineConfig(model_path=directory, cache_dir=tmp_path_factory.mktemp("cache"), max_batch_size=2,
                            max_length=64)
    return hf_model, PIPELINE_REGISTRY.retrieve(config)[1]


class OpenAIPenalties(LogitsProcessor):
    """Frequency and presence penalties for ``transformers.generate`` (which has none): OpenAI's formula over
    the tokens generated after the prompt."""

    def __init__(self, prompt_length: int, frequency: float, presence: float):
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.zeros_like(scores)
        output = input_ids[:, self.prompt_length:]
        counts.scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def hf_generate(hf_model, sampling: SamplingParams) -> list[int]:
    processors = LogitsProcessorList()
    if sampling.frequency_penalty or sampling.presence_penalty:
        processors.append(OpenAIPenalties(len(PROMPT), sampling.frequency_penalty, sampling.presence_penalty))
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                repetition_penalty=sampling.repetition_penalty, logits_processor=processors)
    return out[0, len(PROMPT):].tolist()


def next_token_path(pipe, sampling: SamplingParams) -> list[int]:
    """The step-level API (MAX's ``next_token``), several steps per call."""
    context = pipe.new_context(PROMPT, sampling)
    while not context.is_done:
        pipe.next_token({context.request_id: context}, num_steps=5)
    pipe.release(context)
    return context.generated


def engine_path(pipe, sampling: SamplingParams) -> list[int]:
    """The serving path: the engine's scheduler, next to another request that has no penalty."""
    engine = LLMEngine(pipe)
    plain = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    request = engine.add_request(PROMPT, sampling)
    other = engine.add_request(PROMPT, plain)
    tokens: dict[str, list[int]] = {request: [], other: []}
    for output in engine.stream():
        tokens[output.request_id].append(output.token)
    assert tokens[other] == pipe.generate_tokens([PROMPT], plain)[0]  # a neighbour's penalty does not leak
    return tokens[request]


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.3),
                                       dict(frequency_penalty=0.8, presence_penalty=0.5),
                                       dict(repetition_penalty=1.1, frequency_penalty=-0.3, presence_penalty=1.0)],
                         ids=["repetition", "frequency+presence", "all"])
def test_greedy_generation_with_penalties_matches_transformers_on_both_paths(tiny, penalties):
    hf_model, pipe = tiny
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, **penalties)
    expected = hf_generate(hf_model, sampling)
    unpenalized = pipe.generate_tokens([PROMPT], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))[0]
    assert expected != unpenalized, "the penalty should change this greedy sequence, or the test proves nothing"
    assert next_token_path(pipe, sampling) == expected
    assert engine_path(pipe, sampling) == expected
    assert pipe.generate_tokens([PROMPT], sampling)[0] == expected


def test_seeded_sampling_with_penalties_is_the_same_on_both_paths(tiny):
    _, pipe = tiny
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.9, top_p=0.95, seed=11,
                              repetition_penalty=1.2, frequency_penalty=0.4, presence_penalty=0.2)
    assert next_token_path(pipe, sampling) == engine_path(pipe, sampling)
