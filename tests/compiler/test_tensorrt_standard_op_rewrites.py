"""The tensorrt target's rewrites of ops TensorRT's 10.1 parser lacks (``decompose_attention``: ONNX Attention;
``cumsum_in_float``: integer CumSum), each against the original op run by the real onnxruntime on random inputs,
and what ``decompose_attention`` does not cover refused with the node named."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ember.compiler.passes.cumsum_in_float import cumsum_in_float
from ember.compiler.passes.decompose_attention import decompose_attention

F = TensorProto.FLOAT


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _attention_model(heads: int, head_dim: int, mask_type: int | None, **attrs) -> onnx.ModelProto:
    hidden = heads * head_dim
    inputs = [helper.make_tensor_value_info(n, F, ["b", "s", hidden]) for n in ("q", "k", "v")]
    names = ["q", "k", "v"]
    if mask_type is not None:
        inputs.append(helper.make_tensor_value_info("mask", mask_type, ["b", 1, "s", "s"]))
        names.append("mask")
    node = helper.make_node("Attention", names, ["y"], name="attn", q_num_heads=heads, kv_num_heads=heads, **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", F, ["b", "s", hidden])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("heads,head_dim", [(4, 8), (3, 20), (1, 7)])
@pytest.mark.parametrize("mask_type", [None, F, TensorProto.BOOL], ids=["no-mask", "float-mask", "bool-mask"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_decomposed_attention_matches_onnxruntimes(heads, head_dim, mask_type, scale):
    rng = np.random.default_rng(heads * 100 + head_dim)
    model = _attention_model(heads, head_dim, mask_type, **({} if scale is None else {"scale": scale}))
    feeds = {n: rng.standard_normal((2, 5, heads * head_dim)).astype(np.float32) for n in ("q", "k", "v")}
    if mask_type == F:
        feeds["mask"] = np.where(rng.random((2, 1, 5, 5)) < 0.3, -1e4, 0.0).astype(np.float32)
    elif mask_type == TensorProto.BOOL:
        keep = rng.random((2, 1, 5, 5)) > 0.3
        keep[..., 0] = True  # every query sees at least one key
        feeds["mask"] = keep
    expected = _run(model, feeds)
    rewritten = decompose_attention(ir.from_proto(model))
    assert [n.op_type for n in rewritten.graph].count("Attention") == 0
    np.testing.assert_allclose(_run(ir.to_proto(rewritten), feeds), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attrs,named", [({"is_causal": 1}, "is_causal=1"), ({"softcap": 30.0}, "softcap=30.0")])
def test_what_the_attention_rewrite_does_not_cover_is_refused(attrs, named):
    model = ir.from_proto(_attention_model(2, 4, None, **attrs))
    with pytest.raises(ValueError, match=rf"Attention node 'attn': the standard-op rewrite does not cover {named}"):
        decompose_attention(model)


def test_integer_cumsum_runs_in_float_with_the_same_result():
    node = helper.make_node("CumSum", ["x", "axis"], ["y"], name="positions", exclusive=1)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor("axis", TensorProto.INT64, [], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    feeds = {"x": np.random.default_rng(0).integers(0, 2, (3, 300)).astype(np.int64)}
    rewritten = cumsum_in_float(ir.from_proto(model))
    nodes = list(rewritten.graph)
    assert [n.op_type for n in nodes] == ["Cast", "CumSum", "Cast"]
    assert nodes[0].attributes["to"].value == ir.DataType.FLOAT and nodes[2].attributes["to"].value == ir.DataType.INT64
    out = _run(ir.to_proto(rewritten), feeds)
    assert out.dtype == np.int64 and np.array_equal(out, _run(model, feeds))
