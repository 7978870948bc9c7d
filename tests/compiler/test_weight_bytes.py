"""The specs' weight bytes per encoding (what ``PipelineModel.estimate_weights_size`` reports before compiling)
against the initializers the compiler really produces for that encoding, on tiny random checkpoints."""
from __future__ import annotations

import pytest

from ember.compiler import CompileOptions, get_target
from ember.graphs.architectures import BERT, LLAMA, PHI3
from ember.graphs.weights.safetensors import SafetensorsWeights
from ember.runtime.pipelines import DecoderPipelineModel, PipelineConfig

from ..graphs.bert import tiny_encoders
from ..reference import tiny_models

TOLERANCE = 0.03


def lowered_bytes(spec, hf_config, directory, encoding: str) -> int:
    graph = spec.build(hf_config, SafetensorsWeights(directory), "safetensors", CompileOptions().graph_options())
    lowered = get_target("ort-cpu").lower(graph, encoding)
    return sum(v.const_value.nbytes for v in lowered.graph.initializers.values() if v.const_value is not None)


@pytest.mark.parametrize("variant", ["llama-gqa-llama3", "llama-mqa-linear", "qwen2-bias"])
@pytest.mark.parametrize("encoding", ["float32", "q8_0", "q4_0"])
def test_decoder_weight_bytes_match_the_compiled_initializers(tmp_path, variant, encoding):
    model = tiny_models.make_model(variant, tmp_path)
    expected = lowered_bytes(LLAMA, model.config, tmp_path, encoding)
    estimate = DecoderPipelineModel.estimate_weights_size(PipelineConfig(model_path=tmp_path, encoding=encoding),
                                                          huggingface_config=model.config)
    assert abs(estimate - expected) <= TOLERANCE * expected, (estimate, expected)


@pytest.mark.parametrize("encoding", ["float32", "q8_0", "q4_0"])
def test_phi3_weight_bytes_match_the_compiled_initializers(tmp_path, encoding):
    """Phi-3's fused projections, split by its weight rules, take what Llama's separate ones do."""
    from transformers import Phi3Config, Phi3ForCausalLM

    model = tiny_models.save_random_model(Phi3Config(**tiny_models.COMMON, num_key_value_heads=2), Phi3ForCausalLM,
                                          tmp_path)
    expected = lowered_bytes(PHI3, model.config, tmp_path, encoding)
    estimate = PHI3.weight_bytes(PHI3.config_from_hf(model.config), encoding)
    assert abs(estimate - expected) <= TOLERANCE * expected, (estimate, expected)


@pytest.mark.parametrize("variant", ["bert", "roberta"])
@pytest.mark.parametrize("encoding", ["float32", "w8a8"])
def test_encoder_weight_bytes_match_the_compiled_initializers(tmp_path, variant, encoding):
    model = tiny_encoders.make_model(variant, tmp_path)
    expected = lowered_bytes(BERT, model.config, tmp_path, encoding)
    estimate = BERT.weight_bytes(BERT.config_from_hf(model.config), encoding)
    assert abs(estimate - expected) <= TOLERANCE * expected, (estimate, expected)
