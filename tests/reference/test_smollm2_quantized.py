"""SmolLM2-135M-Instruct in the GGUF's own encoding (``q4_1``: its Q4_1 layers and Q8_0 embedding table
repacked into MatMulNBits as they are, int8 activations inside the kernel) against transformers running the
same GGUF dequantized, and against ember's float32 path.

* Greedy agreement: at each of 32 decode steps, ember's token is transformers' argmax given the same
  prefix (ember's own tokens so far, so one early difference does not count against every later step);
  at least 24 of 32 on each prompt.
* Per-token negative log-likelihood of a fixed 256-token English text (``data/nll_text.txt``, written for
  these tests): within 2% of the float32 path's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import smollm2_pipeline
from .decode_loop import greedy_steps
from .test_smollm2_gguf import PROMPTS

pytestmark = pytest.mark.slow

NLL_TEXT = Path(__file__).with_name("data") / "nll_text.txt"
NLL_TOKENS = 256


@pytest.fixture(scope="module")
def smollm2_q4_1(smollm2_path, smollm2_cache):
    tokenizer, pipeline = smollm2_pipeline(smollm2_path, smollm2_cache, "q4_1")
    assert pipeline.pipeline_model.artifact.manifest["encoding"] == "q4_1"
    return tokenizer, pipeline


@pytest.mark.parametrize("prompt", PROMPTS)
def test_q4_1_greedy_agrees_with_transformers(smollm2_hf, smollm2_q4_1, prompt):
    tokenizer, pipeline = smollm2_q4_1
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ours, _ = greedy_steps(pipeline, ids, 32)
    with torch.no_grad():
        reference = smollm2_hf(torch.tensor([ids + ours])).logits[0].numpy()
    hf_greedy = reference[len(ids) - 1:len(ids) + 31].argmax(-1).tolist()
    agree = sum(a == b for a, b in zip(ours, hf_greedy))
    prefix = next((i for i, (a, b) in enumerate(zip(ours, hf_greedy)) if a != b), len(ours))
    print(f"q4_1 {prompt!r}: {tokenizer.decode(ours)!r}; {agree}/32 steps agree, first {prefix} identical")
    assert agree >= 24


def mean_nll(pipeline, ids: list[int]) -> float:
    """Mean negative log-likelihood of ``ids[1:]`` given their prefixes, from one prefill."""
    model = pipeline.pipeline_model
    ctx = pipeline.new_context(ids)
    logits = model.execute(model.prepare_initial_token_inputs([ctx])).logits[0, :len(ids)].astype(np.float64)
    model.release(ctx.request_id)
    shifted = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())


def test_q4_1_nll_within_2_percent_of_float32(smollm2_float32, smollm2_q4_1):
    tokenizer, float_pipeline = smollm2_float32
    ids = tokenizer.encode(NLL_TEXT.read_text(encoding="utf-8"))[:NLL_TOKENS]
    assert len(ids) == NLL_TOKENS
    reference = mean_nll(float_pipeline, ids)
    ours = mean_nll(smollm2_q4_1[1], ids)
    print(f"NLL per token over {NLL_TOKENS} tokens: float32 {reference:.4f}, q4_1 {ours:.4f} "
          f"({100 * (ours / reference - 1):+.2f}%)")
    assert abs(ours / reference - 1) <= 0.02
