"""Qwen 3 and Gemma 2 as Llama variants: their configs read what transformers' configs say (and refuse what no
graph can be built from, naming the file and field), their checkpoint checks name a missing or misshapen tensor,
Gemma's norms read as ``1 + w`` in float32, their weight bytes count what the checkpoint holds beyond a Llama's,
and a GGUF of either is refused naming the supported architectures."""
from __future__ import annotations

import numpy as np
import pytest
from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ember.graphs.architectures import GEMMA2, LLAMA, QWEN3, spec_for
from ember.graphs.weights import SafetensorsWeights
from ember.graphs.weights.adapter import WeightRef
from ember.runtime.pipelines import ModelSource

from ..reference.tiny_models import COMMON, save_random_model

QWEN3_EXTRA = dict(num_key_value_heads=2, head_dim=20, use_sliding_window=True, sliding_window=6,
                   max_window_layers=1, attention_bias=True)
GEMMA2_EXTRA = dict(num_key_value_heads=2, head_dim=24, sliding_window=8, query_pre_attn_scalar=20,
                    attn_logit_softcapping=None, final_logit_softcapping=30.0, hidden_act="silu")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folders = {}
    for name, config_class, model_class, extra in (("qwen3", Qwen3Config, Qwen3ForCausalLM, QWEN3_EXTRA),
                                                   ("gemma2", Gemma2Config, Gemma2ForCausalLM, GEMMA2_EXTRA)):
        folders[name] = tmp_path_factory.mktemp(name)
        save_random_model(config_class(**COMMON, **extra), model_class, folders[name], vector_std=0.3)
    return folders


def hf_config(folder):
    return ModelSource.resolve(folder).hf_config()


def test_configs_read_what_transformers_says(checkpoints):
    assert spec_for("Qwen3ForCausalLM") is QWEN3 and spec_for("Gemma2ForCausalLM") is GEMMA2
    qwen = QWEN3.config_from_hf(hf_config(checkpoints["qwen3"]))
    assert (qwen.architecture, qwen.head_dim, qwen.sliding_windows, qwen.attention_bias) == \
        ("Qwen3ForCausalLM", 20, (0, 6, 6), True)
    gemma = GEMMA2.config_from_hf(hf_config(checkpoints["gemma2"]))
    assert gemma.architecture == "Gemma2ForCausalLM"
    assert gemma.hidden_act == "gelu_pytorch_tanh"  # hidden_activation; the config's hidden_act is ignored
    assert gemma.sliding_windows == (8, 0, 8)  # layer_types: sliding, full, sliding
    assert gemma.attention_scale == pytest.approx(20 ** -0.5)
    assert (gemma.attn_logit_softcapping, gemma.final_logit_softcapping, gemma.tie_word_embeddings) == (0.0, 30.0, True)
    assert not QWEN3.gguf_architectures and not GEMMA2.gguf_architectures
    assert QWEN3.weights_formats == GEMMA2.weights_formats == ("safetensors",)


@pytest.mark.parametrize("field,value,match", [
    ("hidden_activation", "relu2", "hidden_activation 'relu2' is not supported"),
    ("query_pre_attn_scalar", None, "query_pre_attn_scalar is missing"),
    ("query_pre_attn_scalar", -4, "query_pre_attn_scalar must be a positive number"),
    ("attn_logit_softcapping", float("nan"), "attn_logit_softcapping must be a positive number"),
    ("final_logit_softcapping", -30.0, "final_logit_softcapping must be a positive number"),
])
def test_gemma2_config_refuses_what_no_graph_is_built_from(field, value, match):
    config = Gemma2Config(**COMMON, **GEMMA2_EXTRA)
    config.__dict__[field] = value  # past transformers' own validation, as a hand-made config.json may be
    with pytest.raises(ValueError, match=match):
        GEMMA2.config_from_hf(config)


@pytest.mark.parametrize("family,tensor,message", [
    ("qwen3", "model.layers.1.self_attn.k_norm.weight", "has no tensor model.layers.1.self_attn.k_norm.weight"),
    ("qwen3", "model.layers.2.self_attn.o_proj.bias", "has no tensor model.layers.2.self_attn.o_proj.bias"),
    ("gemma2", "model.layers.0.post_feedforward_layernorm.weight",
     "has no tensor model.layers.0.post_feedforward_layernorm.weight"),
])
def test_checkpoint_check_names_a_missing_tensor(checkpoints, family, tensor, message):
    spec = QWEN3 if family == "qwen3" else GEMMA2
    config = spec.config_from_hf(hf_config(checkpoints[family]))
    weights = spec.adapt(config, SafetensorsWeights(checkpoints[family]), "safetensors")
    spec.check_checkpoint(config, weights)
    del weights._refs[tensor]
    with pytest.raises(ValueError, match=message):
        spec.check_checkpoint(config, weights)


def test_checkpoint_check_names_a_misshapen_norm(checkpoints):
    config = QWEN3.config_from_hf(hf_config(checkpoints["qwen3"]))
    weights = QWEN3.adapt(config, SafetensorsWeights(checkpoints["qwen3"]), "safetensors")
    name = "model.layers.0.self_attn.q_norm.weight"
    weights._refs[name] = WeightRef(name, (21,), weights[name].load)
    with pytest.raises(ValueError, match=r"q_norm.weight has shape \[21\], but the config's head_dim is \[20\]"):
        QWEN3.check_checkpoint(config, weights)


def test_gemma2_norms_read_as_one_plus_weight(checkpoints):
    source = SafetensorsWeights(checkpoints["gemma2"])
    config = GEMMA2.config_from_hf(hf_config(checkpoints["gemma2"]))
    weights = GEMMA2.adapt(config, source, "safetensors")
    for name in ("model.norm.weight", "model.layers.2.input_layernorm.weight",
                 "model.layers.1.pre_feedforward_layernorm.weight"):
        stored = source.load(name)
        assert np.any(stored != 0)
        np.testing.assert_array_equal(weights[name].load(), stored.astype(np.float32) + np.float32(1))
    projection = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(weights[projection].load(), source.load(projection))  # only norms move
    half = GEMMA2.weight_rules["safetensors"](config, source)[0].transform(np.array([1e-3], np.float16), None)
    assert half.dtype == np.float32 and half[0] == np.float32(np.float16(1e-3)) + np.float32(1)


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_weight_bytes_count_what_a_llama_does_not_have(checkpoints, family):
    spec = QWEN3 if family == "qwen3" else GEMMA2
    config = spec.config_from_hf(hf_config(checkpoints[family]))
    source = SafetensorsWeights(checkpoints[family])
    llama_names = {"q_proj", "k_proj", "v_proj", "o_proj.weight", "gate_proj", "up_proj", "down_proj",
                   "input_layernorm", "post_attention_layernorm", "embed_tokens", "model.norm", "lm_head"}
    extra = sum(int(np.prod(source.shape(n))) * 4 for n in source.keys()
                if not any(part in n for part in llama_names) or n.endswith("o_proj.bias"))
    assert extra > 0
    assert spec.weight_bytes(config, "float32") - LLAMA.weight_bytes(config, "float32") == extra


@pytest.mark.parametrize("gguf_architecture", ["qwen3", "gemma2"])
def test_gguf_of_either_is_refused(tmp_path, gguf_architecture):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / f"{gguf_architecture}.gguf"
    writer = gguf.GGUFWriter(str(path), gguf_architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=rf"GGUF architecture '{gguf_architecture}' is not supported; "
                                         r"supported: llama, mistral, qwen2"):
        ModelSource.resolve(path).hf_config()
