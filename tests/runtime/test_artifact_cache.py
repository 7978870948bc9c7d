"""The compile cache and the artifact's integrity: a second load is a load, a corrupt file is named and
recompiled, and nothing half-written is left behind."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ember.compiler import ArtifactError, verify_artifact
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, SamplingParams

from ..reference.tiny_models import make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama-gqa-llama3", directory)
    return directory


def pipeline(model_dir, cache_dir, **kwargs):
    return PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=model_dir, cache_dir=cache_dir, max_batch_size=2,
                                                     **kwargs))[1]


def test_second_load_uses_the_cache_and_corruption_recompiles(model_dir, cache_dir):
    first = pipeline(model_dir, cache_dir)
    assert first.pipeline_model.resolved.compiled
    artifact = first.pipeline_model.artifact
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["architecture"] == "LlamaForCausalLM" and manifest["target"] == "ort-cpu"
    assert {"rank0/model.onnx", "rank0/model.onnx.data", "config.json", "tokenizer/tokenizer.json"} <= set(manifest["files"])
    assert manifest["source"]["sha256"] and manifest["kv_params"]["n_kv_heads"] == 2
    assert [i["name"] for i in manifest["graph"]["inputs"]][:3] == ["input_ids", "input_lengths", "cache_lengths"]
    import onnx
    onnx.checker.check_model(str(artifact.rank_model(0)))  # the written model, external data included
    tokens = first.generate_tokens([[1, 5, 9, 12]], SamplingParams(max_new_tokens=8, ignore_eos=True))

    second = pipeline(model_dir, cache_dir)
    assert not second.pipeline_model.resolved.compiled
    assert second.pipeline_model.artifact.path == artifact.path

    data = artifact.path / "rank0" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="rank0/model.onnx.data"):
        verify_artifact(artifact.path)
    third = pipeline(model_dir, cache_dir)
    assert third.pipeline_model.resolved.compiled
    assert third.generate_tokens([[1, 5, 9, 12]], SamplingParams(max_new_tokens=8, ignore_eos=True)) == tokens
    leftovers = [p for p in (cache_dir / "artifacts").iterdir() if p.name.startswith(".") and p.is_dir()]
    assert leftovers == []  # no temporary folder (the artifact's lock file, empty, stays: artifact_lock.py)


def test_a_truncated_file_is_named(model_dir, cache_dir):
    artifact = pipeline(model_dir, cache_dir).pipeline_model.artifact
    (artifact.path / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match="tokenizer/tokenizer.json"):
        verify_artifact(artifact.path)


def test_an_artifact_directory_runs_as_a_model(model_dir, cache_dir):
    built = pipeline(model_dir, cache_dir)
    direct = pipeline(built.pipeline_model.artifact.path, cache_dir)
    prompt = [[1, 7, 7, 3]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert direct.generate_tokens(prompt, params) == built.generate_tokens(prompt, params)


def test_kv_cache_buffers_are_updated_in_place(model_dir, cache_dir):
    pipe = pipeline(model_dir, cache_dir)
    manager = pipe.pipeline_model.kv_manager
    addresses = [k.ctypes.data for k in manager.keys]
    ctx = pipe.new_context([1, 4, 5, 6], SamplingParams(max_new_tokens=3, ignore_eos=True))
    pipe.next_token({ctx.request_id: ctx}, 1)
    slot = manager.slot(ctx.request_id)
    assert np.abs(manager.keys[0][slot, :, :4]).sum() > 0  # the graph wrote into our buffer
    pipe.next_token({ctx.request_id: ctx}, 1)
    assert manager.cache_length(ctx.request_id) == 5
    assert [k.ctypes.data for k in manager.keys] == addresses
    pipe.release(ctx)
    assert manager.num_active == 0


@pytest.mark.parametrize("encoding", ["float32", "q4_0"])
def test_a_compile_shows_every_stage_not_only_the_writing(model_dir, cache_dir, caplog, encoding):
    """Progress covers the whole compile: reading the weights into the graph, each lowering pass of the target for
    that encoding, then writing; the bar's total is that count (so its percentage is honest)."""
    import logging

    from ember.compiler import CompileOptions
    from ember.compiler.compile import compile_stage_count
    from ember.compiler.compile_progress import pass_name
    from ember.compiler.targets import get_target

    caplog.set_level(logging.DEBUG, logger="ember.compiler.compile_progress")
    pipeline(model_dir, cache_dir / encoding, encoding=encoding)
    stages = [record.args[0] for record in caplog.records if record.msg.startswith("compile stage")]
    passes = [f"lowering: {pass_name(p)}" for p in get_target("ort-cpu").passes_for(encoding)]
    assert stages == ["reading the weights into the graph", *passes, "writing"]
    assert len(stages) == compile_stage_count(CompileOptions(encoding=encoding), before=1)
