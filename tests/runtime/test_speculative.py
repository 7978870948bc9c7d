"""Speculative decoding (issue 15, point 3) on real tiny models through onnxruntime: prompt-lookup and draft-model
drafts verified in one multi-token step on the paged cache give exactly the tokens of plain decoding (greedy, and
seeded sampling: every emitted token is one draw from the same distribution), mixed with plain requests in one
engine; rejected drafts leave no page behind; the rejection rule keeps the target distribution; the draft length
follows the acceptance rate."""
from __future__ import annotations

import numpy as np
import pytest

from ember.runtime.engine import LLMEngine
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, SamplingParams
from ember.runtime.scheduler import SchedulerConfig
from ember.runtime.speculative import AdaptiveDraftLength, NgramDrafter, rejection_sample
from ember.runtime.speculative.verification import target_distribution

from ..reference.tiny_models import VOCAB, make_model

REPETITIVE = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]
PROMPTS = [REPETITIVE, [11, 12, 13, 14, 11, 12, 13, 14, 11, 12], [20, 31, 42, 53, 64, 75, 86, 97, 108, 119, 130],
           [4, 4, 4, 4, 4, 4], list(range(40, 75))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    target = tmp_path_factory.mktemp("tiny-spec-target")
    make_model("llama-gqa-llama3", target)
    draft = tmp_path_factory.mktemp("tiny-spec-draft")
    make_model("llama-gqa-llama3", draft, seed=1)
    return target, draft, tmp_path_factory.mktemp("cache")


def load(tiny, max_length: int = 96, **kwargs):
    target, _, cache = tiny
    config = PipelineConfig(model_path=target, cache_dir=cache, kv_cache_strategy="paged", max_length=max_length,
                            kv_cache_page_size=4, max_batch_size=6, **kwargs)
    return PIPELINE_REGISTRY.retrieve(config)[1]


@pytest.fixture(scope="module")
def plain(tiny):
    return load(tiny)


@pytest.fixture(scope="module")
def ngram(tiny):
    return load(tiny, speculative="ngram", num_speculative_tokens=4, speculative_adaptive=False)


def check(pipeline) -> None:
    pipeline.pipeline_model.kv_manager.check_invariants()


def no_pages_held(pipeline) -> bool:
    return pipeline.pipeline_model.kv_manager.pool.num_referenced == 0


def test_ngram_lookup_takes_the_latest_longest_match():
    drafter = NgramDrafter(min_n=1, max_n=3)
    assert drafter.lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]
    assert drafter.lookup([1, 2, 3, 4], 2) == []
    assert drafter.lookup([5, 6, 5], 4) == [6, 5]


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 17, 40])
def test_greedy_ngram_output_is_identical_to_plain_decoding(plain, ngram, max_new_tokens):
    sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    before = ngram.runner.speculator.stats.accepted
    assert ngram.generate_tokens(PROMPTS, sampling) == plain.generate_tokens(PROMPTS, sampling)
    if max_new_tokens >= 17:
        assert ngram.runner.speculator.stats.accepted > before  # drafts were accepted, not merely proposed
    check(ngram)
    assert no_pages_held(ngram)


def test_a_stop_token_inside_an_accepted_run_stops_there(plain, ngram):
    reference = plain.generate_tokens([REPETITIVE], SamplingParams(max_new_tokens=30, ignore_eos=True))[0]
    for stop in sorted(set(reference)):
        sampling = SamplingParams(max_new_tokens=30, stop_token_ids=(stop,))
        expected = plain.generate_tokens([REPETITIVE], sampling)
        assert ngram.generate_tokens([REPETITIVE], sampling) == expected
        assert expected[0][-1] == stop
    check(ngram)
    assert no_pages_held(ngram)


def test_max_length_inside_an_accepted_run(plain, ngram):
    prompt = REPETITIVE * 4 + [5, 6]  # 74 tokens of 96: generation ends by length
    sampling = SamplingParams(ignore_eos=True)
    expected = plain.generate_tokens([prompt], sampling)
    assert len(expected[0]) == 96 - len(prompt)
    assert ngram.generate_tokens([prompt], sampling) == expected
    assert no_pages_held(ngram)


def test_seeded_sampling_with_penalties_is_identical_to_plain_decoding(plain, ngram):
    params = [SamplingParams(temperature=0.8, top_k=20, seed=s, max_new_tokens=24, ignore_eos=True) for s in range(4)]
    params.append(SamplingParams(temperature=0.7, top_p=0.9, seed=9, repetition_penalty=1.3, frequency_penalty=0.2,
                                 max_new_tokens=24, ignore_eos=True))
    params.append(SamplingParams(max_new_tokens=24, ignore_eos=True, presence_penalty=0.5))
    for p in params:
        assert ngram.generate_tokens(PROMPTS[:2], p) == plain.generate_tokens(PROMPTS[:2], p)


def test_engine_mixes_speculative_rows_with_prompts_and_logprobs(plain, ngram):
    def run(pipeline):
        engine = LLMEngine(pipeline, SchedulerConfig(max_num_batched_tokens=16))  # prompts chunked beside decodes
        ids = [engine.add_request(p, SamplingParams(max_new_tokens=20, ignore_eos=True, top_logprobs=2))
               for p in PROMPTS]
        outputs: dict[str, list] = {i: [] for i in ids}
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs[out.request_id].append((out.token, out.log_probabilities["token_log_probability"],
                                                out.finish_reason))
            check(pipeline)
            steps += 1
        return [outputs[i] for i in ids], steps

    expected, plain_steps = run(plain)
    got, spec_steps = run(ngram)
    assert [[t for t, _, _ in row] for row in got] == [[t for t, _, _ in row] for row in expected]
    assert [[f for _, _, f in row] for row in got] == [[f for _, _, f in row] for row in expected]
    np.testing.assert_allclose([lp for row in got for _, lp, _ in row], [lp for row in expected for _, lp, _ in row],
                               atol=2e-4)
    assert spec_steps < plain_steps  # several tokens per step where drafts were accepted
    assert no_pages_held(ngram)


def test_rejections_preemptions_and_cancellations_leak_no_page(tiny):
    pipeline = load(tiny, speculative="ngram", num_speculative_tokens=6, speculative_adaptive=False,
                    kv_cache_pages=30)
    engine = LLMEngine(pipeline, SchedulerConfig(max_num_batched_tokens=24))
    rng = np.random.default_rng(0)
    live: list[str] = []
    for step in range(150):
        if rng.random() < 0.3:
            prompt = (rng.integers(4, 12, size=int(rng.integers(3, 20)))).tolist()  # few distinct tokens: many drafts
            live.append(engine.add_request(prompt, SamplingParams(temperature=float(rng.choice([0.0, 1.0])),
                                                                  seed=step, max_new_tokens=int(rng.integers(1, 40)),
                                                                  ignore_eos=True)))
        if live and rng.random() < 0.1:
            engine.abort_request(live.pop(int(rng.integers(len(live)))))
        engine.step()
        check(pipeline)
    for request_id in live:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    check(pipeline)
    stats = pipeline.runner.speculator.stats
    assert stats.drafted > stats.accepted > 0  # both accepted and rejected drafts happened
    assert no_pages_held(pipeline)


@pytest.mark.parametrize("kwargs, message", [
    (dict(speculative="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(speculative="medusa"), "speculative must be"),
    (dict(speculative="draft"), "draft_model_path"),
    (dict(speculative="ngram", kv_cache_strategy="continuous"), "kv_cache_strategy='paged'"),
])
def test_bad_speculative_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(model_path="x", **kwargs)


def test_rejection_sampling_keeps_the_target_distribution(plain):
    """Draft tokens drawn from a draft distribution q and passed through :func:`rejection_sample` are distributed
    as the target p (the processed distribution of the tiny model's next-token logits at temperature 1.3, top-k 12).
    Chi-square over the 12 candidates with 40 000 draws; the threshold is the 1 - 1e-6 quantile of chi2(11), so a
    correct rule fails about once in a million runs."""
    context = plain.new_context(REPETITIVE, SamplingParams(temperature=1.3, top_k=12, seed=0))
    plain.pipeline_model.claim(context)
    logits = plain.pipeline_model.execute_rows([(context, len(REPETITIVE))])[0]
    plain.pipeline_model.release(context.request_id)
    p = target_distribution(logits, context)
    support = np.flatnonzero(p)
    assert len(support) == 12
    rng = np.random.default_rng(1234)
    q = rng.dirichlet(np.ones(VOCAB))  # a draft that disagrees with the target, over the whole vocabulary
    n = 40_000
    draws = rng.choice(VOCAB, size=n, p=q)
    counts = np.zeros(VOCAB)
    accepted = 0
    for x in draws:
        token, ok = rejection_sample(p, q, int(x), rng)
        counts[token] += 1
        accepted += ok
    assert counts[p == 0].sum() == 0
    expected = n * p[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 51.0, chi2  # scipy.stats.chi2.ppf(1 - 1e-6, 11) = 50.9
    # acceptance is sum(min(p, q)) in expectation (binomial, 6 standard deviations)
    rate = np.minimum(p, q).sum()
    assert abs(accepted / n - rate) < 6 * np.sqrt(rate * (1 - rate) / n)


def test_adaptive_draft_length_follows_the_acceptance_rate():
    length = AdaptiveDraftLength(max_k=6, verify_token_cost=0.1, probe_interval=8)
    for _ in range(30):  # every draft accepted: draft the most
        length.record(length.next_k() or 1, length.next_k() or 1)
    assert length.next_k() == 6
    rng = np.random.default_rng(0)
    ks = []
    for _ in range(200):  # drafts almost never accepted: stop drafting, probe one token every 8 plain steps
        k = length.next_k()
        ks.append(k)
        if k:
            length.record(k, int(rng.random() < 0.05))
    assert length.rate < 0.2
    tail = ks[100:]
    assert set(tail) <= {0, 1} and 8 <= tail.count(0) and tail.count(1) == pytest.approx(len(tail) / 8, abs=2)
    for _ in range(40):  # acceptance comes back: the probes see it and drafting resumes
        k = length.next_k()
        if k:
            length.record(k, k)
    assert length.next_k() >= 4
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        AdaptiveDraftLength(max_k=0)


def test_adaptive_speculation_is_still_identical(plain, tiny):
    adaptive = load(tiny, speculative="ngram", num_speculative_tokens=5)
    sampling = SamplingParams(max_new_tokens=30, ignore_eos=True)
    assert adaptive.generate_tokens(PROMPTS, sampling) == plain.generate_tokens(PROMPTS, sampling)


@pytest.mark.parametrize("draft", ["same", "other"])
def test_draft_model_greedy_output_is_identical(plain, tiny, draft):
    target, other, _ = tiny
    pipeline = load(tiny, draft_model_path=target if draft == "same" else other, num_speculative_tokens=3,
                    speculative_adaptive=False)
    sampling = SamplingParams(max_new_tokens=25, ignore_eos=True)
    assert pipeline.generate_tokens(PROMPTS, sampling) == plain.generate_tokens(PROMPTS, sampling)
    stats = pipeline.runner.speculator.stats
    if draft == "same":  # the target drafting for itself: every draft is accepted
        assert stats.accepted == stats.drafted > 0
    engine = LLMEngine(pipeline, SchedulerConfig(max_num_batched_tokens=16))
    ids = [engine.add_request(p, sampling) for p in PROMPTS]
    engine.step()
    engine.step()
    engine.abort_request(ids[0])  # a cancelled request's draft-model pages are released too
    while engine.has_unfinished_requests():
        engine.step()
    assert no_pages_held(pipeline)
    draft_manager = pipeline.runner.speculator.drafter.model.kv_manager
    draft_manager.check_invariants()
    assert draft_manager.pool.num_referenced == 0


def test_sampled_second_token_follows_the_model_distribution(tiny):
    """Temperature 1, top-k 4, a prompt holding every token (so any first token has a prompt-lookup match): the
    second token is decided by verifying a prompt-lookup draft. Its empirical distribution over 3000 seeds against the exact one, sum over the first token t1 of
    p(t1) p(t2 | t1), from the model's logits; chi-square at the 1 - 1e-6 quantile (a correct sampler fails about
    once in a million runs)."""
    params = dict(temperature=1.0, top_k=4, max_new_tokens=3, ignore_eos=True)
    ngram = load(tiny, max_length=200, speculative="ngram", speculative_adaptive=False)
    ngram.runner.speculator.drafter = NgramDrafter(min_n=1)  # a one-token match: every first token has a draft
    model = ngram.pipeline_model
    prompt = list(range(3, VOCAB)) + [5, 6, 7]

    def distribution(tokens: list[int]) -> np.ndarray:
        context = ngram.new_context(tokens, SamplingParams(**params))
        model.claim(context)
        try:
            logits = model.execute_rows_uncommitted([(context, len(tokens))], [1])[0][0][0]
        finally:
            model.release(context.request_id)
        return target_distribution(logits, context)

    first = distribution(prompt)
    assert first[:3].sum() == 0  # every candidate first token is in the prompt
    exact = np.zeros(VOCAB)
    for t1 in np.flatnonzero(first):
        exact += first[t1] * distribution(prompt + [int(t1)])
    before = ngram.runner.speculator.stats.verify_rows
    n = 3000
    counts = np.zeros(VOCAB)
    for start in range(0, n, 500):
        contexts = [ngram.new_context(prompt, SamplingParams(seed=seed, **params))
                    for seed in range(start, start + 500)]
        for _ in ngram.generate(contexts):
            pass
        for context in contexts:
            counts[context.generated[1]] += 1
    assert ngram.runner.speculator.stats.verify_rows - before >= n  # each second token came from a verification
    support = np.flatnonzero(exact > 0)
    assert counts[exact == 0].sum() == 0
    expected = n * exact[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    bound = {df: q for df, q in [(3, 30.7), (7, 38.6), (11, 45.4), (15, 51.5)]}  # chi2.ppf(1 - 1e-6, df)
    df = len(support) - 1
    assert df <= 15
    assert chi2 < bound[min(b for b in bound if b >= df)], (chi2, df)
    check(ngram)


def test_trim_and_truncate_return_pages_and_keep_the_prefix_cache_right():
    from ember.runtime.backends import OrtCpuBackend
    from ember.runtime.kv_cache import KVCacheParams, KVCacheStrategy, PagedKVCacheManager

    params = KVCacheParams(dtype="float32", n_kv_heads=1, head_dim=2, num_layers=1,
                           cache_strategy=KVCacheStrategy.PAGED, page_size=4)
    manager = PagedKVCacheManager(params, 12, 4, 40, backend=OrtCpuBackend())
    manager.claim("a", list(range(10, 16)))
    manager.reserve("a", 6 + 5)  # the prompt and 5 drafts
    manager.commit("a", list(range(10, 16)) + [1])  # verification kept one token: 7 committed, 2 pages needed
    assert len(manager.page_table("a")) == 3 and manager.trim("a") == 1 and len(manager.page_table("a")) == 2
    manager.check_invariants()
    with pytest.raises(ValueError, match="prefix cache"):  # page 0 of "a" is registered: never rewritten
        manager.truncate("a", 3)
    manager.truncate("a", 5)  # within the unregistered page: allowed
    assert manager.tokens("a") == list(range(10, 15))
    manager.check_invariants()
    plain = PagedKVCacheManager(params, 12, 4, 40, enable_prefix_caching=False, backend=OrtCpuBackend())
    plain.claim("b", list(range(20)))
    plain.reserve("b", 20)
    plain.commit("b", list(range(20)))
    plain.truncate("b", 6)
    assert plain.tokens("b") == list(range(6)) and len(plain.page_table("b")) == 2
    plain.check_invariants()
    plain.release("b")
    assert plain.pool.num_referenced == 0
