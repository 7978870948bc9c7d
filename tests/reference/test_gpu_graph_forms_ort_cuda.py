"""The ort-cuda target's float32 graph, run by the real onnxruntime on its CPU provider, against transformers.

No GPU here: the artifact (manifest: backend ``onnxruntime-cuda`` on device kind ``cuda``) is loaded through a
backend table that maps ``onnxruntime-cuda`` to :class:`CpuStandIn`, onnxruntime's CPU backend under that name,
so the pipeline, the KV binding and the very graph ort-cuda writes run end to end. In float32 the CUDA kernels of
GroupQueryAttention and PagedAttention do not exist (they take float16/bfloat16 only), so ort-cuda's float32
attention is the explicit form (ScatterND into the cache + explicit attention; the paged ScatterND + Gather form):
both strategies, two shapes (head_dim 32 with grouped heads; head_dim 20, which GroupQueryAttention's helper
rejects in any precision). Logits of the prompt and 16 decode steps within 1e-4 relative; greedy tokens identical.
The half encodings' fused kernels are checked in ``tests/compiler/test_ort_cuda_target.py``.
"""
from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from ember.compiler.passes.lower_cached_attention_explicit import FORM as EXPLICIT_FORM
from ember.compiler.passes.lower_paged_attention import FORM as PAGED_FORM
from ember.compiler.targets.ort_cuda import HALF_ONLY
from ember.graphs.nn import KVCacheStrategy
from ember.runtime.backends import OrtCpuBackend
from ember.runtime.compile_cache import ensure_artifact
from ember.runtime.pipelines import PipelineConfig, ReturnLogits
from ember.runtime.pipelines.architectures import BUILTIN_ARCHITECTURES
from ember.runtime.pipelines.registry import PipelineRegistry

from .decoder_checks import assert_greedy_matches, assert_logits_match
from .tiny_models import COMMON, make_model, save_random_model


class CpuStandIn(OrtCpuBackend):
    """onnxruntime's CPU provider standing in for the CUDA one: the real onnxruntime runs the real graph."""

    name = "onnxruntime-cuda"
    device_kind = "cuda"

    def __init__(self, settings=None, num_threads: int = 1, device_index: int = 0):
        super().__init__({**(settings or {}), "providers": ["CPUExecutionProvider"]}, num_threads, device_index)


REGISTRY = PipelineRegistry(BUILTIN_ARCHITECTURES, artifacts=ensure_artifact,
                            backends={CpuStandIn.name: CpuStandIn})
PROMPT = [1, 17, 99, 23, 5, 142, 77, 31, 64, 8, 120]


def head_dim_20(directory):
    config = LlamaConfig(**{**COMMON, "hidden_size": 60, "num_attention_heads": 3}, num_key_value_heads=1,
                         head_dim=20, tie_word_embeddings=False)
    return save_random_model(config, LlamaForCausalLM, directory, seed=3)


SHAPES = {"llama-gqa-hd32": lambda d: make_model("llama-gqa-llama3", d), "llama-mqa-hd20": head_dim_20}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, SHAPES[request.param](directory), tmp_path_factory.mktemp("cache"), {}


@pytest.mark.parametrize("strategy", [KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED], ids=["continuous", "paged"])
def test_float32_ort_cuda_graph_matches_transformers(checkpoint, strategy):
    name, directory, hf_model, cache, memo = checkpoint
    config = PipelineConfig(model_path=directory, cache_dir=cache, max_batch_size=2, target="ort-cuda",
                            encoding="float32", kv_cache_strategy=strategy, return_logits=ReturnLogits.ALL)
    pipe = REGISTRY.retrieve(config)[1]
    manifest = pipe.pipeline_model.artifact.manifest
    assert manifest["runtime"]["backend"] == "onnxruntime-cuda" and manifest["runtime"]["device_kind"] == "cuda"
    assert manifest["runtime"]["settings"]["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    form = EXPLICIT_FORM if strategy is KVCacheStrategy.CONTINUOUS else PAGED_FORM
    for lowering in manifest["lowerings"]:
        assert lowering["form"] == form and any(HALF_ONLY in r for r in lowering["rejected"]), lowering
    assert_logits_match(name, hf_model, pipe, PROMPT)
    assert_greedy_matches(name, hf_model, memo, pipe, [PROMPT, PROMPT[:4]], n=16)
