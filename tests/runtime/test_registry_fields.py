"""MAX's ``SupportedArchitecture`` fields do what MAX's do: ``required_arguments`` override the configuration,
``context_validators`` check every new request (rejecting it with the validator's message), ``tokenizer_cls``."""
from __future__ import annotations

import dataclasses

import pytest

from ember.runtime.engine import LLMEngine
from ember.runtime.pipelines import (BUILTIN_ARCHITECTURES, PIPELINE_REGISTRY, KVCacheStrategy, PipelineConfig, PipelineRegistry,
                                     SamplingParams, TextTokenizer)

from ..reference.tiny_models import make_model

LLAMA = next(a for a in BUILTIN_ARCHITECTURES if a.name == "LlamaForCausalLM")
COMPILING = PIPELINE_REGISTRY.artifacts  # compile on first use


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-registry-fields")
    make_model("llama-gqa-llama3", directory)
    return directory


@pytest.fixture(scope="module")
def config(model_dir, tmp_path_factory):
    return PipelineConfig(model_path=model_dir, cache_dir=tmp_path_factory.mktemp("cache"), max_length=128,
                          max_batch_size=2)


def test_required_arguments_override_the_configuration(config):
    required = {"max_length": 48, "kv_cache_strategy": KVCacheStrategy.PAGED}
    registry = PipelineRegistry([dataclasses.replace(LLAMA, required_arguments=required)], artifacts=COMPILING)
    _, pipeline = registry.retrieve(config)
    assert pipeline.max_length == 48
    assert pipeline.pipeline_config.kv_cache_strategy is KVCacheStrategy.PAGED
    assert pipeline.pipeline_model.artifact.manifest["kv_cache_strategy"] == "paged"
    assert config.max_length == 128 and config.kv_cache_strategy is None  # the caller's configuration is untouched


def test_required_arguments_must_name_configuration_fields():
    with pytest.raises(ValueError, match="no PipelineConfig field: max_len"):
        dataclasses.replace(LLAMA, required_arguments={"max_len": 48})


def test_context_validators_reject_new_requests_with_their_message(config):
    def at_most_eight_tokens(context) -> None:
        if len(context.prompt_tokens) > 8:
            raise ValueError(f"this deployment takes prompts of at most 8 tokens, not {len(context.prompt_tokens)}")

    registry = PipelineRegistry([dataclasses.replace(LLAMA, context_validators=[at_most_eight_tokens])],
                                artifacts=COMPILING)
    _, pipeline = registry.retrieve(config)
    with pytest.raises(ValueError, match="at most 8 tokens, not 11"):
        pipeline.new_context(list(range(1, 12)))
    engine = LLMEngine(pipeline)
    with pytest.raises(ValueError, match="at most 8 tokens"):
        engine.add_request(list(range(1, 12)))
    assert not engine.has_unfinished_requests()
    assert len(engine.generate([[1, 5, 6]], SamplingParams(max_new_tokens=2, ignore_eos=True))[0]) == 2


def test_tokenizer_cls_is_the_tokenizer_class():
    assert LLAMA.tokenizer_cls is TextTokenizer


def test_a_registry_that_does_not_compile_loads_artifacts_only(config):
    compiled = PIPELINE_REGISTRY.resolve(config)
    registry = PipelineRegistry([LLAMA])
    with pytest.raises(ValueError, match="is not a compiled ember artifact and this registry does not compile"):
        registry.retrieve(config)
    resolved = registry.resolve(dataclasses.replace(config, model_path=compiled.artifact.path))
    assert resolved.artifact.path == compiled.artifact.path and not resolved.compiled
    assert resolved.huggingface_config["num_hidden_layers"] == compiled.huggingface_config["num_hidden_layers"]
    pipeline = registry.build_pipeline(resolved)
    assert pipeline.pipeline_model.resolved is resolved


def test_a_load_resolves_the_model_once(config, monkeypatch):
    """The registry resolves the model's path once; nothing after it (compile cache, pipeline model, tokenizer)
    probes the file system for it again."""
    from ember.runtime.pipelines.model_source import ModelSource

    PIPELINE_REGISTRY.retrieve(config)  # compiled and cached
    resolve, calls = ModelSource.resolve.__func__, []

    def counting(cls, model_path):
        calls.append(model_path)
        return resolve(cls, model_path)

    monkeypatch.setattr(ModelSource, "resolve", classmethod(counting))
    _, pipeline = PIPELINE_REGISTRY.retrieve(config)
    assert calls == [config.model_path] and not pipeline.pipeline_model.resolved.compiled


def test_weight_adapters_override_how_the_checkpoint_is_read(tmp_path):
    """An entry's ``weight_adapters`` are what the compile reads the checkpoint with (not decoration): rules that
    zero the output head give all-zero logits, from an artifact of their own (never the spec rules' cached one)."""
    import numpy as np

    from ember.graphs.weights.adapter import WeightRule
    from ember.runtime.pipelines import WeightsFormat

    make_model("llama-mqa-linear", tmp_path / "model")  # untied head
    spec_rules = LLAMA.spec.weight_rules["safetensors"]

    def zero_head(config, checkpoint):
        return [WeightRule(r"lm_head\.weight", "lm_head.weight", lambda w, _m: np.zeros_like(w), moves_rows=True),
                *spec_rules(config, checkpoint)]

    config = PipelineConfig(model_path=tmp_path / "model", cache_dir=tmp_path / "cache", max_batch_size=1)
    plain = PIPELINE_REGISTRY.retrieve(config)[1]
    registry = PipelineRegistry([dataclasses.replace(LLAMA, weight_adapters={WeightsFormat.safetensors: zero_head})],
                                artifacts=COMPILING)
    zeroed = registry.retrieve(config)[1]
    assert zeroed.pipeline_model.artifact.path != plain.pipeline_model.artifact.path
    for pipeline, all_zero in ((plain, False), (zeroed, True)):
        ctx = pipeline.new_context([1, 5, 9])
        logits = pipeline.pipeline_model.execute(pipeline.pipeline_model.prepare_initial_token_inputs([ctx]))
        pipeline.release(ctx)
        assert bool(np.all(logits.next_token_logits == 0)) is all_zero


@pytest.mark.parametrize("asked,message", [
    ({"encoding": "q8_0"}, "compiled with encoding 'float32', not the 'q8_0' asked for"),
    ({"kv_cache_strategy": "paged"}, "compiled with kv_cache_strategy 'continuous', not the 'paged' asked for"),
    ({"kv_cache_bit_width": 8}, "compiled with kv_cache_bit_width 0, not the 8 asked for"),
    ({"target": "ort-cpu-qdq"}, "compiled with target 'ort-cpu', not the 'ort-cpu-qdq' asked for"),
])
def test_options_an_artifact_was_not_compiled_with_are_refused(config, asked, message):
    artifact = PIPELINE_REGISTRY.resolve(dataclasses.replace(config, encoding="float32",
                                                             kv_cache_strategy="continuous")).artifact
    with pytest.raises(ValueError, match=message):
        PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=artifact.path, cache_dir=config.cache_dir, **asked))
    same = PipelineConfig(model_path=artifact.path, cache_dir=config.cache_dir, encoding="float32",
                          kv_cache_strategy="continuous", max_batch_size=1)
    assert PIPELINE_REGISTRY.resolve(same).artifact.path == artifact.path  # what it was compiled as is fine


@pytest.mark.parametrize("tamper", ["edit", "add"])
def test_an_artifacts_tokenizer_is_read_only_after_the_artifact_verifies(config, tmp_path, tamper):
    """The tokenizer's loader reads whatever its folder holds, so a compiled artifact given as the model is verified
    before its tokenizer is loaded, as before its graphs are."""
    import shutil

    from ember.compiler.artifact import ArtifactError

    _, pipeline = PIPELINE_REGISTRY.retrieve(config)
    copy = tmp_path / "artifact"
    shutil.copytree(pipeline.pipeline_model.artifact.path, copy)
    assert isinstance(PIPELINE_REGISTRY.retrieve_tokenizer(PipelineConfig(model_path=copy)), TextTokenizer)
    if tamper == "edit":
        with open(copy / "tokenizer" / "tokenizer.json", "a") as out:
            out.write(" ")
        expected = "tokenizer/tokenizer.json has"
    else:
        (copy / "tokenizer" / "tokenization_evil.py").write_text("raise SystemExit('ran')\n")
        expected = "tokenizer/tokenization_evil.py is not in the manifest"
    with pytest.raises(ArtifactError, match=expected):
        PIPELINE_REGISTRY.retrieve_tokenizer(PipelineConfig(model_path=copy))
    with pytest.raises(ArtifactError, match=expected):
        PipelineRegistry(BUILTIN_ARCHITECTURES).get_active_tokenizer(copy)
