"""ember against transformers on tiny random Phi-3 checkpoints (same weights, float32), with both KV cache strategies.

Every shape stores Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` (split by ember's weight rules). Two shapes, so
that both CONTINUOUS lowerings meet them: grouped-query heads at head_dim 16 with half of it rotary (a
``RotaryEmbedding`` before GroupQueryAttention) and a window of 8 on every layer under a 20-token prompt; and
multi-query at head_dim 32 (rotary in the GroupQueryAttention kernel) with tied embeddings, ``longrope`` scaling
(random short factors, an attention factor from 256 / 64 positions) and two end-of-sequence tokens. PAGED runs
both through the explicit paged lowering.

Checked per shape and strategy: the logits of the whole prompt and of 16 decode steps within 1e-4 relative, and
24 greedy tokens identical for two prompts; for the longrope shape, the positions it takes.
"""
from __future__ import annotations

import numpy as np
import pytest
from transformers import Phi3Config, Phi3ForCausalLM

from ember.compiler.passes.lower_attention_gqa import EXTERNAL_ROTARY_FORM, GQA_FORM
from ember.graphs.nn import KVCacheStrategy
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig

from .decoder_checks import assert_greedy_matches, assert_logits_match, compiled_pipeline
from .tiny_models import COMMON, VOCAB, save_random_model

PROMPTS = [[1] + list(np.random.default_rng(s).integers(4, VOCAB, n)) for s, n in ((1, 19), (2, 4))]
LONGROPE_POSITIONS = 64  # above every prompt and its generated tokens here: transformers uses the short factors
SHAPES = {
    "phi3-gqa-window-partial": {"num_key_value_heads": 2, "sliding_window": 8, "partial_rotary_factor": 0.5},
    "phi3-mqa-longrope": {
        "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True, "eos_token_id": [2, 7],
        "original_max_position_embeddings": LONGROPE_POSITIONS,
        "rope_scaling": {"type": "longrope", "long_factor": [8.0] * 16,
                         "short_factor": np.random.default_rng(0).uniform(1.0, 4.0, 16).tolist()}},
}
#: the CONTINUOUS lowering each shape is there to exercise (PAGED: always the explicit paged form)
CONTINUOUS_FORMS = {"phi3-gqa-window-partial": EXTERNAL_ROTARY_FORM, "phi3-mqa-longrope": GQA_FORM}
STRATEGIES = [KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    """``(name, folder, transformers model, memo of transformers' greedy tokens)`` of one shape."""
    directory = tmp_path_factory.mktemp(request.param)
    config = Phi3Config(**{**COMMON, **SHAPES[request.param]})
    return request.param, directory, save_random_model(config, Phi3ForCausalLM, directory, vector_std=0.3), {}


@pytest.fixture(scope="module", params=STRATEGIES, ids=lambda s: s.value)
def shape(request, checkpoint, tmp_path_factory):
    """One shape and strategy: ``(name, transformers model, greedy memo, pipeline)``, compiled once."""
    name, directory, hf_model, greedy = checkpoint
    pipe = compiled_pipeline(directory, tmp_path_factory.mktemp(f"{name}-cache"), request.param,
                             CONTINUOUS_FORMS[name], max_batch_size=2)
    return f"{name}-{request.param.value}", hf_model, greedy, pipe


def test_prefill_and_decode_logits_match(shape):
    name, hf_model, _, pipe = shape
    assert_logits_match(name, hf_model, pipe, PROMPTS[0])


def test_greedy_generation_is_identical(shape):
    name, hf_model, greedy, pipe = shape
    assert_greedy_matches(name, hf_model, greedy, pipe, PROMPTS)


@pytest.mark.parametrize("checkpoint", ["phi3-mqa-longrope"], indirect=True)
def test_longrope_takes_its_original_positions_and_stops_at_each_eos(checkpoint, tmp_path):
    """A longrope model takes ``original_max_position_embeddings`` positions (a longer ``max_length`` is refused),
    and stops at every end-of-sequence token its config lists."""
    _, directory, _, _ = checkpoint
    config = PipelineConfig(model_path=directory, cache_dir=tmp_path, max_batch_size=1)
    pipe = PIPELINE_REGISTRY.retrieve(config)[1]
    assert pipe.max_length == LONGROPE_POSITIONS
    assert pipe.eos_token_ids == {2, 7}
    with pytest.raises(ValueError, match=str(LONGROPE_POSITIONS)):
        PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=directory, cache_dir=tmp_path, max_batch_size=1,
                                                  max_length=LONGROPE_POSITIONS + 1))
