"""The tensorrt target's float32 graph, run by the real onnxruntime on its CPU provider, against transformers.

No GPU and no TensorRT library here, so the engine cannot be built; the graph it would be built from can still be
run. The artifact (manifest: backend ``tensorrt`` on device kind ``cuda``) is loaded through a backend table that
maps ``tensorrt`` to :class:`CpuStandIn`, onnxruntime's CPU backend under that name: the pipeline, the KV binding
(one buffer as each cache input and its output, as the TensorRT backend binds one address) and the very graph the
tensorrt target writes -- standard ops only, rotary and RMSNorm decomposed, the checker passed -- run end to end.
Both strategies, two shapes (head_dim 32 with grouped heads and llama3 rope; head_dim 20 with one KV head, not a
multiple of 8 or 16). Logits of the prompt and 16 decode steps within 1e-4 relative; greedy tokens identical.
The graph's static checks (ops, types, q4_0) are in ``tests/compiler/test_tensorrt_target.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from ember.compiler.passes.lower_cached_attention_explicit import FORM as EXPLICIT_FORM
from ember.compiler.passes.lower_paged_attention import FORM as PAGED_FORM
from ember.compiler.targets.tensorrt import NO_CONTRIB_OPS
from ember.graphs.nn import KVCacheStrategy
from ember.runtime.backends import OrtCpuBackend
from ember.runtime.compile_cache import ensure_artifact
from ember.runtime.pipelines import PipelineConfig, ReturnLogits
from ember.runtime.pipelines.architectures import BUILTIN_ARCHITECTURES
from ember.runtime.pipelines.registry import PipelineRegistry

from .decoder_checks import assert_greedy_matches, assert_logits_match
from .tiny_models import COMMON, make_model, save_random_model


class CpuStandIn(OrtCpuBackend):
    """onnxruntime's CPU provider standing in for TensorRT: the real onnxruntime runs the real graph."""

    name = "tensorrt"
    device_kind = "cuda"

    def __init__(self, settings=None, num_threads: int = 1, device_index: int = 0):
        super().__init__({**(settings or {}), "providers": ["CPUExecutionProvider"]}, num_threads, device_index)


REGISTRY = PipelineRegistry(BUILTIN_ARCHITECTURES, artifacts=ensure_artifact, backends={CpuStandIn.name: CpuStandIn})
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
def test_float32_tensorrt_graph_matches_transformers(checkpoint, strategy):
    name, directory, hf_model, cache, memo = checkpoint
    config = PipelineConfig(model_path=directory, cache_dir=cache, max_batch_size=2, target="tensorrt",
                            encoding="float32", kv_cache_strategy=strategy, return_logits=ReturnLogits.ALL)
    pipe = REGISTRY.retrieve(config)[1]
    manifest = pipe.pipeline_model.artifact.manifest
    assert manifest["runtime"]["backend"] == "tensorrt" and manifest["runtime"]["device_kind"] == "cuda"
    form = EXPLICIT_FORM if strategy is KVCacheStrategy.CONTINUOUS else PAGED_FORM
    for lowering in manifest["lowerings"]:
        assert lowering["form"] == form and any(NO_CONTRIB_OPS in r for r in lowering["rejected"]), lowering
    assert_logits_match(name, hf_model, pipe, PROMPT)
    assert_greedy_matches(name, hf_model, memo, pipe, [PROMPT, PROMPT[:4]], n=16)


@pytest.mark.parametrize("strategy", [KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED], ids=["continuous", "paged"])
def test_float16_tensorrt_graph_keeps_greedy_tokens(checkpoint, strategy):
    """The float16 form (weights, activations and KV cache in half; norms' statistics and softmax in float32) run
    by onnxruntime on the CPU: the manifest's KV dtype is the graph's, and greedy tokens are transformers' float32
    ones on these seeds (the GPU check asks >= 99 % top-1 on a real model)."""
    name, directory, hf_model, cache, memo = checkpoint
    config = PipelineConfig(model_path=directory, cache_dir=cache, max_batch_size=2, target="tensorrt",
                            encoding="float16", kv_cache_strategy=strategy)
    pipe = REGISTRY.retrieve(config)[1]
    cache_input = "key_cache.0" if strategy is KVCacheStrategy.PAGED else "past_key_values.0.key"
    assert pipe.pipeline_model.artifact.manifest["kv_params"]["dtype"] == "float16"
    assert pipe.pipeline_model.model.input_dtype(cache_input) == np.float16
    assert_greedy_matches(name, hf_model, memo, pipe, [PROMPT, PROMPT[:4]], n=16)


@pytest.mark.parametrize("variant", ["bert", "xlm-roberta"])
@pytest.mark.parametrize("encoding", ["float32", "float16"])
def test_tensorrt_encoder_graph_matches_transformers(tmp_path, variant, encoding):
    """The encoders' ONNX ``Attention`` (opset 23, no TensorRT importer) rewritten as standard ops
    (``decompose_attention``): the tensorrt graph passes the parser table and, on onnxruntime's CPU provider,
    gives transformers' last hidden state at every valid position (float32: 1e-4 relative; float16: cosine
    >= 0.999)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from ember.compiler.targets import get_target

    from ..graphs.bert.tiny_encoders import VARIANTS, build, hf_last_hidden_state, make_model as make_encoder
    from ..graphs.bert.tiny_encoders import padded_batch

    hf_model = make_encoder(variant, tmp_path)
    config_class, _, extra = VARIANTS[variant]
    lowered = get_target("tensorrt").lower(build(hf_model.config, tmp_path), encoding)
    assert not [n for n in lowered.graph if n.op_type == "Attention"]
    session = ort.InferenceSession(ir.to_proto(lowered).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = padded_batch(hf_model.config)
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    ours = session.run(None, feeds)[0].astype(np.float64)
    reference = hf_last_hidden_state(hf_model, feeds).astype(np.float64)
    valid = feeds["attention_mask"].astype(bool)
    ours, reference = ours[valid], reference[valid]
    if encoding == "float32":
        assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()
    else:
        cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
        assert cosine.min() >= 0.999, cosine.min()
