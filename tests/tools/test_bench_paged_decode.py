"""``python -m ember.tools.bench_paged_decode`` on a tiny Llama compiled CONTINUOUS and PAGED (the ort-cpu form, and
the explicit form for comparison): every artifact generates through the runtime, the first is the ratios' base,
and each row names the artifact's encoding, strategy and attention form."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from ember.compiler.compile import CompileOptions
from ember.compiler.passes.lower_paged_attention import FORM as EXPLICIT_FORM, lower_paged_attention
from ember.compiler.targets import TARGETS
from ember.compiler.targets.ort_cpu import ORT_CPU
from ember.graphs.nn import KVCacheStrategy
from ember.runtime.compile_cache import compile_source
from ember.runtime.pipelines import PIPELINE_REGISTRY, ModelSource
from ember.tools import bench_paged_decode

from ..reference.tiny_models import make_model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    make_model("llama-gqa-llama3", directory)
    source = ModelSource.resolve(directory)
    architecture = PIPELINE_REGISTRY.retrieve_architecture(directory)
    out = tmp_path_factory.mktemp("artifacts")
    paths = []
    for name, strategy in (("continuous", KVCacheStrategy.CONTINUOUS), ("paged", KVCacheStrategy.PAGED)):
        options = CompileOptions(kv_cache_strategy=strategy)
        paths.append(compile_source(source, architecture, options, out / name, "0" * 64).path)
    paged_passes = [p for p in ORT_CPU.passes if "paged" not in p.__name__]
    paged_passes.insert(1, lower_paged_attention)
    with pytest.MonkeyPatch.context() as patch:  # the same compile with the explicit paged form
        patch.setitem(TARGETS, "ort-cpu", dataclasses.replace(ORT_CPU, passes=tuple(paged_passes)))
        paths.append(compile_source(source, architecture, CompileOptions(kv_cache_strategy=KVCacheStrategy.PAGED),
                                    out / "paged-explicit", "0" * 64).path)
    return paths


def test_runs_every_artifact_and_reports_ratios(artifacts):
    results = bench_paged_decode.run(artifacts, batch=2, context=5, new_tokens=6, runs=2, threads=1)
    assert [r.name.split(":")[0] for r in results] == ["float32 continuous", "float32 paged", "float32 paged"]
    assert results[2].name.endswith(EXPLICIT_FORM)
    assert results[0].ratio == 1.0
    assert all(0 < r.execute_s <= r.step_s and r.ratio > 0 for r in results)


def test_main_reports_each_batch_and_context(artifacts, caplog):
    with caplog.at_level(logging.INFO, logger=bench_paged_decode.logger.name):  # whatever 'ember' is set to
        bench_paged_decode.main([str(path) for path in artifacts[:2]] + [
            "--batch", "1", "2", "--context", "4", "--new-tokens", "3", "--runs", "1", "--threads", "1"])
    rows = [record.message for record in caplog.records if "ms/step" in record.message]
    assert len(rows) == 4 and sum("batch   2" in row for row in rows) == 2
