"""The ort-cpu lowering keeps the meaning of the high-level graph: the reference evaluator (ember ops in
numpy) and onnxruntime (GroupQueryAttention, fused norms) agree on prefill with padding and on decode with
different cache lengths, including a sliding window."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from ember.compiler.targets import get_target
from ember.graphs.architectures.llama import SPEC
from ember.graphs.options import GraphOptions
from ember.graphs.ir.custom import reference_evaluator_ops
from ember.graphs.weights import SafetensorsWeights
from ember.runtime.pipelines import ModelSource

from ..reference.tiny_models import make_model


@pytest.fixture(scope="module", params=["llama-gqa-llama3", "mistral-window"])
def graphs(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_model(request.param, directory)
    source = ModelSource.resolve(directory)
    high = SPEC.build(source.hf_config(), SafetensorsWeights(directory), "safetensors", GraphOptions())
    high_proto = ir.to_proto(high)
    onnx.checker.check_model(high_proto, full_check=True)
    lowered = get_target("ort-cpu").lower(ir.from_proto(high_proto))
    lowered_proto = ir.to_proto(lowered)
    onnx.checker.check_model(lowered_proto)
    assert not any(n.domain == "ember" for n in lowered_proto.graph.node)
    assert any(n.op_type == "GroupQueryAttention" for n in lowered_proto.graph.node)
    session = ort.InferenceSession(lowered_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ReferenceEvaluator(high_proto, new_ops=reference_evaluator_ops())
    return source.hf_config(), reference, session


def feeds(hf_config, tokens, input_lengths, cache_lengths, caches):
    f = {"input_ids": tokens, "input_lengths": np.array(input_lengths, np.int32),
         "cache_lengths": np.array(cache_lengths, np.int32)}
    for i, (k, v) in enumerate(caches):
        f[f"past_key_values.{i}.key"], f[f"past_key_values.{i}.value"] = k, v
    return f


def test_reference_and_onnxruntime_agree(graphs):
    hf_config, reference, session = graphs
    rng = np.random.default_rng(0)
    batch, max_len = 3, 40
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    shape = (batch, hf_config.num_key_value_heads, max_len, head_dim)
    caches = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(hf_config.num_hidden_layers)]
    lengths = [13, 5, 9]
    tokens = rng.integers(3, hf_config.vocab_size, (batch, 13)).astype(np.int64)
    f = feeds(hf_config, tokens, lengths, [0, 0, 0], caches)
    expected, got = reference.run(None, f), session.run(None, f)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=1e-4)
    caches = [(got[1 + 2 * i], got[2 + 2 * i]) for i in range(hf_config.num_hidden_layers)]
    for step in range(3):  # decode with three different cache lengths per row
        tokens = rng.integers(3, hf_config.vocab_size, (batch, 1)).astype(np.int64)
        f = feeds(hf_config, tokens, [1, 1, 1], [n + step for n in lengths], caches)
        expected, got = reference.run(None, f), session.run(None, f)
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=1e-4)
        for i in range(hf_config.num_hidden_layers):
            for b, n in enumerate(lengths):  # the written cache positions agree
                np.testing.assert_allclose(got[1 + 2 * i][b, :, :n + step + 1], expected[1 + 2 * i][b, :, :n + step + 1],
                                           rtol=1e-4, atol=1e-5)
        caches = [(got[1 + 2 * i], got[2 + 2 * i]) for i in range(hf_config.num_hidden_layers)]
