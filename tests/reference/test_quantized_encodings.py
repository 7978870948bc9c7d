"""Weight-only quantized encodings on tiny random models: int8 logits within 2e-2 relative of float32,
int4 close enough to keep generating, and the compiled graph really uses MatMulNBits."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, ReturnLogits

from .tiny_models import VOCAB, make_model

PROMPT = [1] + list(np.random.default_rng(5).integers(4, VOCAB, 15))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama-q")
    make_model("llama-gqa-llama3", directory)
    return directory, tmp_path_factory.mktemp("cache")


def logits(directory, cache, encoding):
    pipe = PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=directory, cache_dir=cache, max_batch_size=1,
                                                     encoding=encoding, return_logits=ReturnLogits.ALL))[1]
    model = pipe.pipeline_model
    ctx = pipe.new_context(PROMPT)
    out = model.execute(model.prepare_initial_token_inputs([ctx]))
    model.release(ctx.request_id)
    graph = onnx.load(str(model.artifact.rank_model(0)), load_external_data=False).graph
    return out.logits[0], [n.op_type for n in graph.node], model.artifact.manifest["encoding"]


@pytest.mark.parametrize("encoding, tolerance, min_cosine", [("q8_0", 2e-2, 0.999), ("q4_0", 0.5, 0.9)])
def test_quantized_logits_stay_close_to_float32(tiny, encoding, tolerance, min_cosine):
    directory, cache = tiny
    reference, float_ops, _ = logits(directory, cache, "float32")
    ours, ops, recorded = logits(directory, cache, encoding)
    assert recorded == encoding and "MatMulNBits" in ops and "MatMulNBits" not in float_ops
    assert "Gemm" not in ops and "MatMul" not in ops  # every weight product is quantized, the tied head too
    rel = float(np.abs(ours - reference).max() / np.abs(reference).max())
    cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
    print(f"{encoding}: max relative logit error vs float32 {rel:.3g}, min cosine per position {cosine.min():.5f}")
    assert rel < tolerance  # the bound for int8; random 4-bit weights are far noisier than trained ones
    assert cosine.min() > min_cosine


def test_unsupported_encoding_is_a_clear_error(tiny):
    directory, cache = tiny
    with pytest.raises(ValueError, match="does not support encoding 'bfloat16'"):
        PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=directory, cache_dir=cache, encoding="bfloat16"))
    # w8a8 (int8 activations) is for compute-bound encoders; a decoder lists what it supports instead
    with pytest.raises(ValueError, match="does not support encoding 'w8a8'; supported: float32, q8_0"):
        PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=directory, cache_dir=cache, encoding="w8a8"))


def test_quantized_last_token_graph_generates(tiny):
    """The default graph ends in the (quantized) output projection itself: ``logits`` stays its output."""
    directory, cache = tiny
    from ember.runtime.pipelines import SamplingParams
    for encoding in ("q8_0", "q4_0"):
        pipe = PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=directory, cache_dir=cache, max_batch_size=2,
                                                         encoding=encoding))[1]
        tokens = pipe.generate_tokens([PROMPT, PROMPT[:5]], SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert [len(t) for t in tokens] == [6, 6]
        assert pipe.pipeline_model.artifact.manifest["graph"]["outputs"][0]["name"] == "logits"


def test_qdq_target_runs_the_same_codes_as_matmulnbits(tiny):
    """``ort-cpu-qdq`` writes DequantizeLinear + MatMul; onnxruntime fuses it into the same MatMulNBits."""
    directory, cache = tiny
    results = {}
    for target in ("ort-cpu", "ort-cpu-qdq"):
        pipe = PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=directory, cache_dir=cache, max_batch_size=1,
                                                         encoding="q4_0", target=target,
                                                         return_logits=ReturnLogits.ALL))[1]
        model = pipe.pipeline_model
        ctx = pipe.new_context(PROMPT)
        results[target] = model.execute(model.prepare_initial_token_inputs([ctx])).logits[0]
        model.release(ctx.request_id)
        ops = [n.op_type for n in onnx.load(str(model.artifact.rank_model(0)), load_external_data=False).graph.node]
        assert ("DequantizeLinear" in ops) == (target == "ort-cpu-qdq")
        assert ("MatMulNBits" in ops) == (target == "ort-cpu")
    np.testing.assert_allclose(results["ort-cpu-qdq"], results["ort-cpu"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="does not support encoding 'q4_1'"):
        PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=directory, cache_dir=cache, target="ort-cpu-qdq",
                                                  encoding="q4_1"))
