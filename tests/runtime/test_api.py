"""API.md's behaviours for the pipeline and registry names."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ember.runtime.pipelines import (BUILTIN_ARCHITECTURES, PIPELINE_REGISTRY, DecoderPipelineModel, KVCacheStrategy,
                                     ModelInputs, ModelOutputs, PipelineConfig, PipelineRegistry, PipelineTask,
                                     SupportedEncoding, TextGenerationPipeline, get_pipeline_for_task,
                                     upper_bounded_default)

from ..reference.tiny_models import make_model


def test_upper_bounded_default():
    assert upper_bounded_default(upper_bound=2048, default=None) == 2048
    assert upper_bounded_default(upper_bound=2048, default=512) == 512
    with pytest.raises(ValueError, match="upper bound"):
        upper_bounded_default(upper_bound=2048, default=4096)


def test_model_inputs_iterate_tensor_fields_in_order():
    @dataclasses.dataclass(kw_only=True)
    class Inputs(ModelInputs):
        tokens: np.ndarray
        input_row_offsets: np.ndarray

    tokens, offsets = np.arange(5), np.array([0, 2, 5])
    inputs = Inputs(tokens=tokens, input_row_offsets=offsets, kv_cache_inputs=("k", "v"))
    assert [id(x) for x in inputs] == [id(tokens), id(offsets)]
    assert ModelOutputs().next_token_logits is None and ModelOutputs().logits is None


def test_registry_duplicates_and_override():
    registry = PipelineRegistry(BUILTIN_ARCHITECTURES)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(BUILTIN_ARCHITECTURES[0])
    registry.register(BUILTIN_ARCHITECTURES[0], allow_override=True)
    registry.reset()
    assert registry.architectures == {}


def test_builtin_architectures():  # the text-generation ones
    decoders = {a.name for a in BUILTIN_ARCHITECTURES if a.task is PipelineTask.TEXT_GENERATION}
    assert decoders == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                        "Gemma2ForCausalLM", "Phi3ForCausalLM"}
    encoders = {a.name for a in BUILTIN_ARCHITECTURES if a.task is PipelineTask.EMBEDDINGS_GENERATION}
    assert encoders == {"BertModel", "BertForMaskedLM", "BertForSequenceClassification", "RobertaModel",
                        "XLMRobertaModel"}
    for arch in BUILTIN_ARCHITECTURES:
        if arch.task is not PipelineTask.TEXT_GENERATION:
            continue
        assert arch.task is PipelineTask.TEXT_GENERATION
        assert arch.supported_encodings[SupportedEncoding.float32] == [KVCacheStrategy.CONTINUOUS,
                                                                        KVCacheStrategy.PAGED]
        assert set(arch.supported_encodings) == {SupportedEncoding.float32, SupportedEncoding.float16,
                                                SupportedEncoding.bfloat16, SupportedEncoding.q8_0, SupportedEncoding.q4_0,
                                                SupportedEncoding.q4_1, SupportedEncoding.q4_k}
    assert get_pipeline_for_task(PipelineTask.TEXT_GENERATION) is TextGenerationPipeline
    assert get_pipeline_for_task(PipelineTask.EMBEDDINGS_GENERATION).__name__ == "EmbeddingsPipeline"
    with pytest.raises(ValueError, match="no pipeline"):
        get_pipeline_for_task(PipelineTask.AUDIO_GENERATION)


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["FancyNewForCausalLM"], "model_type": "fancy"}')
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    config = PipelineConfig(model_path=tmp_path)
    assert PIPELINE_REGISTRY.retrieve_architecture(tmp_path) is None
    with pytest.raises(ValueError, match="FancyNewForCausalLM.*LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        PIPELINE_REGISTRY.retrieve_pipeline_task(config)


def test_sizing_classmethods(tmp_path):
    make_model("llama-gqa-llama3", tmp_path)
    config = PipelineConfig(model_path=tmp_path, max_length=128)
    hf = PIPELINE_REGISTRY.get_active_huggingface_config(tmp_path)
    assert PIPELINE_REGISTRY.get_active_huggingface_config(tmp_path) is hf  # loaded once
    assert DecoderPipelineModel.calculate_max_seq_len(config, hf) == 128
    with pytest.raises(ValueError):
        DecoderPipelineModel.calculate_max_seq_len(PipelineConfig(model_path=tmp_path, max_length=10**6), hf)
    params = DecoderPipelineModel.get_kv_params(hf, config)
    assert params.bytes_per_token == 2 * 3 * 2 * 32 * 4  # K and V, layers, kv heads, head_dim, float32
    assert DecoderPipelineModel.get_num_layers(hf) == 3
    per_sequence = 128 * params.bytes_per_token
    assert DecoderPipelineModel.infer_optimal_batch_size(config, 10 * per_sequence, huggingface_config=hf) == 10
    capped = PipelineConfig(model_path=tmp_path, max_length=128, kv_cache_bytes=3 * per_sequence)
    assert DecoderPipelineModel.infer_optimal_batch_size(capped, 10 * per_sequence, huggingface_config=hf) == 3
    assert DecoderPipelineModel.estimate_kv_cache_size(
        PipelineConfig(model_path=tmp_path, max_length=128, max_batch_size=2), 10 * per_sequence, [],
        huggingface_config=hf) == 2 * per_sequence
    paged = dict(model_path=tmp_path, max_length=128, kv_cache_strategy="paged", kv_cache_page_size=16)
    page = 16 * params.bytes_per_token  # 128 tokens = 8 pages per sequence, plus one scratch page in all
    assert DecoderPipelineModel.estimate_kv_cache_size(PipelineConfig(**paged, max_batch_size=2), 10 * per_sequence,
                                                       [], huggingface_config=hf) == (2 * 8 + 1) * page
    assert DecoderPipelineModel.estimate_kv_cache_size(PipelineConfig(**paged, max_batch_size=2, kv_cache_pages=5),
                                                       10 * per_sequence, [], huggingface_config=hf) == 6 * page
    assert DecoderPipelineModel.infer_optimal_batch_size(PipelineConfig(**paged, kv_cache_pages=20), 10 * per_sequence,
                                                         huggingface_config=hf) == 2
    weights = DecoderPipelineModel.estimate_weights_size(config)
    import safetensors.numpy
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    rotary = 256 * 32 * 4  # the graph's cos|sin tables: max_position_embeddings x head_dim, float32
    assert weights == sum(t.size * 4 for t in tensors.values()) + rotary


def test_tokenizer_retrieval_without_loading_a_model(tmp_path, cache_dir):
    make_model("qwen2-bias", tmp_path)
    config = PipelineConfig(model_path=tmp_path, cache_dir=cache_dir)
    tokenizer = PIPELINE_REGISTRY.retrieve_tokenizer(config)
    assert tokenizer.encode("w5 w6", add_special_tokens=False) == [5, 6]
    assert PIPELINE_REGISTRY.get_active_tokenizer(tmp_path) is PIPELINE_REGISTRY.get_active_tokenizer(tmp_path)
    tokenizer_factory, pipeline_factory = PIPELINE_REGISTRY.retrieve_factory(config, PipelineTask.TEXT_GENERATION)
    assert tokenizer_factory().encode("w7", add_special_tokens=False) == [7]
    with pytest.raises(ValueError, match="serves text_generation"):
        PIPELINE_REGISTRY.retrieve_factory(config, PipelineTask.EMBEDDINGS_GENERATION)
