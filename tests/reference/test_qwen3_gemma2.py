"""ember against transformers on tiny random Qwen 3 and Gemma 2 checkpoints (same weights, float32, eager attention
for the reference: transformers soft-caps attention there), with both KV cache strategies.

Two shapes of each, so that every attention lowering meets the new features: Qwen 3 at head_dim 20 (the explicit
fallback: GroupQueryAttention needs a multiple of 8) with sliding layers, and at head_dim 32 (GroupQueryAttention,
rotary in the kernel) with MQA, tied embeddings and q/k/v/o bias; Gemma 2 at head_dim 24 (a ``RotaryEmbedding``
before GroupQueryAttention) with a window of 8 under a 20-token prompt and caps low enough to bend the scores
(attention 1.0, logits 3.0), and at head_dim 16 with MQA, a window of 4 and Gemma 2's own caps (50, 30). The
norm weights are random too, so that Gemma's ``1 + w`` and Qwen's q/k norms are exercised. PAGED runs all of
them through the explicit paged lowering.

Checked per shape and strategy: the logits of the whole prompt and of 16 decode steps within 1e-4 relative; 24
greedy tokens identical for two prompts; a batch of 3 prompts of different lengths gives each the tokens it gets
alone (and transformers' tokens).
"""
from __future__ import annotations

import numpy as np
import pytest
from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ember.compiler.passes.lower_attention_gqa import EXTERNAL_ROTARY_FORM, GQA_FORM
from ember.compiler.passes.lower_cached_attention_explicit import FORM as EXPLICIT_FORM
from ember.graphs.nn import KVCacheStrategy
from ember.runtime.pipelines import SamplingParams

from .decoder_checks import assert_greedy_matches, assert_logits_match, compiled_pipeline, reference_greedy
from .tiny_models import COMMON, VOCAB, save_random_model

PROMPTS = [[1] + list(np.random.default_rng(s).integers(4, VOCAB, n)) for s, n in ((1, 19), (2, 4), (3, 12))]
SHAPES = {
    "qwen3-hd20-window": (Qwen3Config, Qwen3ForCausalLM, dict(
        num_key_value_heads=2, head_dim=20, use_sliding_window=True, sliding_window=6, max_window_layers=1,
        tie_word_embeddings=False)),
    "qwen3-hd32-mqa-bias": (Qwen3Config, Qwen3ForCausalLM, dict(
        num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, attention_bias=True)),
    "gemma2-hd24-window-caps": (Gemma2Config, Gemma2ForCausalLM, dict(
        num_key_value_heads=2, head_dim=24, sliding_window=8, query_pre_attn_scalar=20,
        attn_logit_softcapping=1.0, final_logit_softcapping=3.0)),
    "gemma2-hd16-mqa": (Gemma2Config, Gemma2ForCausalLM, dict(
        num_key_value_heads=1, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
}
STRATEGIES = [KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED]
#: the CONTINUOUS lowering each shape is there to exercise (PAGED: always the explicit paged form)
CONTINUOUS_FORMS = {"qwen3-hd20-window": EXPLICIT_FORM, "qwen3-hd32-mqa-bias": GQA_FORM,
                    "gemma2-hd24-window-caps": EXTERNAL_ROTARY_FORM, "gemma2-hd16-mqa": GQA_FORM}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    """``(name, folder, transformers model, memo of transformers' greedy tokens)`` of one shape."""
    config_class, model_class, extra = SHAPES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    model = save_random_model(config_class(**COMMON, **extra), model_class, directory, vector_std=0.3)
    return request.param, directory, model, {}


@pytest.fixture(scope="module", params=STRATEGIES, ids=lambda s: s.value)
def shape(request, checkpoint, tmp_path_factory):
    """One shape and strategy: ``(name, transformers model, greedy memo, pipeline returning every position's
    logits)``; compiled once into its own cache."""
    name, directory, hf_model, greedy = checkpoint
    pipe = compiled_pipeline(directory, tmp_path_factory.mktemp(f"{name}-cache"), request.param,
                             CONTINUOUS_FORMS[name])
    return f"{name}-{request.param.value}", hf_model, greedy, pipe


def test_prefill_and_decode_logits_match(shape):
    name, hf_model, _, pipe = shape
    assert_logits_match(name, hf_model, pipe, PROMPTS[0])


def test_greedy_generation_is_identical(shape):
    name, hf_model, greedy, pipe = shape
    assert_greedy_matches(name, hf_model, greedy, pipe, PROMPTS[:2])


def test_batch_of_prompts_matches_each_alone(shape):
    name, hf_model, greedy, pipe = shape
    sampling = SamplingParams(max_new_tokens=16, ignore_eos=True)
    alone = [pipe.generate_tokens([p], sampling)[0] for p in PROMPTS]
    assert pipe.generate_tokens(PROMPTS, sampling) == alone, name
    assert alone[2] == reference_greedy(hf_model, greedy, PROMPTS[2], 16), name
    assert pipe.pipeline_model.kv_manager.num_active == 0
