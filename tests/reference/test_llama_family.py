"""ember against transformers on tiny random Llama, Mistral and Qwen2 checkpoints (same weights, fp32).

Checked per variant: logits of the whole prompt and of 16 decode steps within 1e-4 relative; 32 greedy
tokens identical; a batch of 3 prompts of different lengths gives each the tokens it gets alone.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, ReturnLogits, SamplingParams

from .tiny_models import VARIANTS, VOCAB, make_model

RTOL = 1e-4
PROMPTS = [[1] + list(np.random.default_rng(s).integers(4, VOCAB, n)) for s, n in ((1, 19), (2, 4), (3, 12))]


def relative_error(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    abs_err = float(np.abs(ours - reference).max())
    return abs_err, abs_err / float(np.abs(reference).max())


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = make_model(request.param, directory)
    cache = tmp_path_factory.mktemp(f"{request.param}-cache")

    def pipeline(**kwargs):
        config = PipelineConfig(model_path=directory, cache_dir=cache, max_batch_size=4, **kwargs)
        return PIPELINE_REGISTRY.retrieve(config)[1]

    return request.param, hf_model, pipeline


def hf_logits(hf_model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].numpy()


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_prefill_and_decode_logits_match(variant):
    name, hf_model, pipeline = variant
    pipe = pipeline(return_logits=ReturnLogits.ALL)
    model = pipe.pipeline_model
    prompt = PROMPTS[0]
    ctx = pipe.new_context(prompt)
    inputs = model.prepare_initial_token_inputs([ctx])
    out = model.execute(inputs)
    abs_err, rel = relative_error(out.logits[0, :len(prompt)], hf_logits(hf_model, prompt))
    print(f"{name} prefill: max abs error {abs_err:.3g}, relative {rel:.3g}")
    assert rel < RTOL

    step_logits = []
    for _ in range(16):
        token = int(np.argmax(out.next_token_logits[0]))
        ctx.start_idx = ctx.active_idx
        ctx.append(token)
        inputs = model.prepare_next_token_inputs(np.array([token]), inputs)
        out = model.execute(inputs)
        step_logits.append(out.next_token_logits[0])
    model.release(ctx.request_id)
    reference = hf_logits(hf_model, ctx.tokens)[len(prompt):len(prompt) + 16]
    abs_err, rel = relative_error(np.stack(step_logits), reference)
    print(f"{name} 16 decode steps: max abs error {abs_err:.3g}, relative {rel:.3g}")
    assert rel < RTOL
    assert model.kv_manager.num_active == 0


def test_greedy_generation_is_identical(variant):
    name, hf_model, pipeline = variant
    pipe = pipeline()
    sampling = SamplingParams(max_new_tokens=32, ignore_eos=True)
    for prompt in PROMPTS[:2]:
        ours = pipe.generate_tokens([prompt], sampling)[0]
        assert ours == hf_greedy(hf_model, prompt, 32), name


def test_batch_of_prompts_matches_each_alone(variant):
    name, hf_model, pipeline = variant
    pipe = pipeline()
    sampling = SamplingParams(max_new_tokens=20, ignore_eos=True)
    alone = [pipe.generate_tokens([p], sampling)[0] for p in PROMPTS]
    together = pipe.generate_tokens(PROMPTS, sampling)
    assert together == alone
    assert together[1] == hf_greedy(hf_model, PROMPTS[1], 20)
    assert pipe.pipeline_model.kv_manager.num_active == 0
