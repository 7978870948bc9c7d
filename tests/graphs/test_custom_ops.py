"""The ember custom ops: reference implementations against a direct (loop-by-loop) numpy computation,
their schemas known to onnx, and the version pin accepted by onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ember.graphs.ir import custom
from ember.graphs.ir.custom.attention import attention_reference
from ember.graphs.ir.versions import EMBER_DOMAIN, IR_VERSION, ONNX_OPSET


def naive_attention(q, k, v, past_k, past_v, cache_lengths, input_lengths, cos, sin, num_heads, kv_heads, window):
    """One query position, one head at a time, with explicit loops."""
    batch, seq, _ = q.shape
    d = q.shape[2] // num_heads
    present_k, present_v = past_k.copy(), past_v.copy()
    out = np.zeros_like(q)

    def rope(x, pos):
        if cos is None:
            return x
        half = cos.shape[1]
        y = x.copy()
        for i in range(half):
            a, b = x[i], x[i + half]
            y[i] = a * cos[pos, i] - b * sin[pos, i]
            y[i + half] = b * cos[pos, i] + a * sin[pos, i]
        return y

    for b in range(batch):
        for i in range(int(input_lengths[b])):
            pos = int(cache_lengths[b]) + i
            for h in range(kv_heads):
                present_k[b, h, pos] = rope(k[b, i, h * d:(h + 1) * d], pos)
                present_v[b, h, pos] = v[b, i, h * d:(h + 1) * d]
    for b in range(batch):
        for i in range(int(input_lengths[b])):
            pos = int(cache_lengths[b]) + i
            for h in range(num_heads):
                kvh = h // (num_heads // kv_heads)
                qh = rope(q[b, i, h * d:(h + 1) * d], pos)
                lo = max(0, pos - window + 1) if window else 0
                scores = np.array([qh @ present_k[b, kvh, j] / np.sqrt(d) for j in range(lo, pos + 1)])
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[b, i, h * d:(h + 1) * d] = sum(p[j - lo] * present_v[b, kvh, j] for j in range(lo, pos + 1))
    return out, present_k, present_v


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("with_rotary", [True, False])
def test_attention_reference_matches_naive_loops(window, with_rotary):
    rng = np.random.default_rng(0)
    batch, seq, heads, kv_heads, d, max_len = 3, 5, 4, 2, 8, 16
    q = rng.standard_normal((batch, seq, heads * d)).astype(np.float32)
    k = rng.standard_normal((batch, seq, kv_heads * d)).astype(np.float32)
    v = rng.standard_normal((batch, seq, kv_heads * d)).astype(np.float32)
    past_k = rng.standard_normal((batch, kv_heads, max_len, d)).astype(np.float32)
    past_v = rng.standard_normal((batch, kv_heads, max_len, d)).astype(np.float32)
    cache_lengths = np.array([0, 4, 7], np.int32)
    input_lengths = np.array([5, 2, 1], np.int32)
    angles = np.arange(max_len)[:, None] * (0.5 ** np.arange(d // 2))[None, :]
    cos, sin = (np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)) if with_rotary else (None, None)
    ours = attention_reference(q, k, v, past_k, past_v, cache_lengths, input_lengths, cos, sin, num_heads=heads,
                               kv_num_heads=kv_heads, sliding_window=window)
    expected = naive_attention(q, k, v, past_k, past_v, cache_lengths, input_lengths, cos, sin, heads, kv_heads,
                               window)
    for b in range(batch):
        n = input_lengths[b]
        np.testing.assert_allclose(ours[0][b, :n], expected[0][b, :n], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1], expected[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours[2], expected[2], rtol=1e-6, atol=1e-6)


def test_schemas_are_registered_with_onnx():
    for schema in custom.SCHEMAS:
        assert onnx.defs.has(schema.name, EMBER_DOMAIN)
        assert onnx.defs.get_schema(schema.name, domain=EMBER_DOMAIN).since_version == 1


def test_version_pin_is_accepted_by_onnxruntime():
    node = helper.make_node("RMSNormalization", ["x", "w"], ["y"], epsilon=1e-5)
    graph = helper.make_graph([node], "pin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                              helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.ones((2, 4), np.float32), "w": np.full(4, 2.0, np.float32)})[0]
    np.testing.assert_allclose(y, 2.0, rtol=1e-4)
