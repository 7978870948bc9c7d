"""Phi-3's spec without compiling: the spec table finds it, its config (window on every layer, longrope's positions
and factors, refusals naming the field), rotary tables equal to transformers', and fused tensors whose rows do not
fit the config refused naming the tensor."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from ember.graphs.architectures import PHI3, SPECS, spec_for
from ember.graphs.nn import RotaryEmbedding
from ember.graphs.options import GraphOptions
from ember.graphs.weights.safetensors import SafetensorsWeights

from ..reference.tiny_models import COMMON, save_random_model

LONGROPE = dict(num_attention_heads=2, max_position_embeddings=256, original_max_position_embeddings=64,
                partial_rotary_factor=0.5, rope_scaling={
                    "type": "longrope", "short_factor": np.random.default_rng(0).uniform(1.0, 4.0, 8).tolist(),
                    "long_factor": [8.0] * 8})


def phi3_config(**extra) -> Phi3Config:
    """A tiny Phi-3 config (its own copy of ``extra``: transformers keeps the rope dict it is given)."""
    return Phi3Config(**{**COMMON, **copy.deepcopy(extra)})


def test_the_spec_table_finds_phi3():
    assert spec_for("Phi3ForCausalLM") is PHI3 and PHI3 in SPECS
    assert PHI3.weights_formats == ("safetensors",) and not PHI3.gguf_architectures


def test_sliding_window_applies_to_every_layer():
    assert PHI3.config_from_hf(phi3_config(sliding_window=8)).sliding_windows == (8, 8, 8)
    assert PHI3.config_from_hf(phi3_config()).sliding_windows == (0, 0, 0)
    config = phi3_config()
    config.architectures = None  # named Phi-3's anyway
    assert PHI3.config_from_hf(config).architecture == "Phi3ForCausalLM"


def test_longrope_takes_the_original_positions(caplog):
    with caplog.at_level(logging.WARNING):
        config = PHI3.config_from_hf(phi3_config(**LONGROPE))
    assert PHI3.max_positions(config) == 64 and config.max_position_embeddings == 64
    assert "the model takes 64 positions, not max_position_embeddings 256" in caplog.text
    assert PHI3.max_positions(PHI3.config_from_hf(phi3_config())) == COMMON["max_position_embeddings"]


def test_longrope_tables_are_transformers_cos_and_sin():
    """Short factors and the attention factor (sqrt(1 + ln 4 / ln 64) for 256 of 64 positions), partial rotary:
    ember's table rows are transformers' cos/sin at each position of a sequence within the original length."""
    hf = phi3_config(**LONGROPE)
    config = PHI3.config_from_hf(hf)
    assert config.rope_scaling.attention_factor == pytest.approx(np.sqrt(1 + np.log(4) / np.log(64)))
    cos, sin = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings, config.rope_scaling,
                               config.partial_rotary_factor).tables()
    positions = torch.arange(64)[None]
    ref_cos, ref_sin = Phi3RotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[1]
    assert half == 8  # 32 * 0.5 / 2
    np.testing.assert_allclose(cos, ref_cos[0, :, :half].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, ref_sin[0, :, :half].numpy(), rtol=0, atol=1e-6)


def test_longrope_table_past_its_positions_is_refused():
    config = PHI3.config_from_hf(phi3_config(**LONGROPE))
    with pytest.raises(ValueError, match="a table of 65 positions is past the 64 it is exact for"):
        RotaryEmbedding(config.head_dim, config.rope_theta, 65, config.rope_scaling, config.partial_rotary_factor)


@pytest.mark.parametrize("factors, shown", [([1.0] * 7, r"\[1.0, 1.0"), ([1.0] * 7 + [float("nan")], "nan"),
                                            ([1.0] * 7 + [-2.0], "-2.0")])
def test_bad_longrope_short_factors_are_refused_naming_the_field(tmp_path, factors, shown):
    hf = phi3_config(**LONGROPE)
    hf.name_or_path = str(tmp_path)
    hf.rope_parameters["short_factor"] = factors  # past transformers' own check, as a hand-edited file would be
    with pytest.raises(ValueError, match=rf"config.json: rope scaling 'longrope' needs short_factor as 8 positive "
                                         rf"numbers \(one per rotary pair of 16 dimensions\), not .*{shown}"):
        PHI3.config_from_hf(hf)


def test_fused_tensors_that_do_not_fit_the_config_are_refused_naming_the_tensor(tmp_path):
    model = save_random_model(phi3_config(num_key_value_heads=2), Phi3ForCausalLM, tmp_path)
    graph = PHI3.build(model.config, SafetensorsWeights(tmp_path), "safetensors", GraphOptions())
    assert "model.layers.0.self_attn.k_proj.weight" in {v.name for v in graph.graph.initializers.values()}
    wrong = phi3_config(num_key_value_heads=1)  # q 64 + k 16 + v 16 rows, but the checkpoint has 64 + 32 + 32
    with pytest.raises(ValueError, match=r"tensor model.layers.0.self_attn.qkv_proj.weight has shape \[128, 64\], "
                                         r"but the config makes it 96 rows: model.layers.0.self_attn.q_proj.weight "
                                         r"rows 0..64, .*k_proj.weight rows 64..80, .*v_proj.weight rows 80..96"):
        PHI3.build(wrong, SafetensorsWeights(tmp_path), "safetensors", GraphOptions())
