"""``fuse_parallel_matmuls``: products of one input become one wider MatMul and a Split, with the same results; and
the two shapes the pass used to break are left as they are: biases that broadcast (``[1]``: concatenated they made a
``[2]`` bias the fused product cannot add) and products whose output is a graph output (the pass raised)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ember.compiler.passes.fuse_parallel_matmuls import fuse_parallel_matmuls

WIDTHS = (4, 6, 6)  # not equal: the split sizes matter
IN = 5


def model(bias_shapes: tuple[tuple[int, ...] | None, ...], outputs_from: str = "consumer") -> onnx.ModelProto:
    """x [2, IN] through one MatMul (+ Add of a bias of the given shape, None: no bias) per width; each result goes
    through a Relu to a graph output, or (``outputs_from="product"``) is itself the graph output."""
    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i, (width, bias_shape) in enumerate(zip(WIDTHS, bias_shapes)):
        inits.append(numpy_helper.from_array(rng.standard_normal((IN, width)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"p{i}"]))
        last = f"p{i}"
        if bias_shape is not None:
            inits.append(numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [last, f"b{i}"], [f"a{i}"]))
            last = f"a{i}"
        if outputs_from == "consumer":
            nodes.append(helper.make_node("Relu", [last], [f"y{i}"]))
            last = f"y{i}"
        outputs.append(helper.make_tensor_value_info(last, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, IN])], outputs,
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, IN)).astype(np.float32)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))


def fused(proto: onnx.ModelProto) -> onnx.ModelProto:
    return ir.to_proto(fuse_parallel_matmuls(ir.from_proto(proto)))


def matmuls(proto: onnx.ModelProto) -> int:
    return sum(n.op_type == "MatMul" for n in proto.graph.node)


@pytest.mark.parametrize("biases", [(None, None, None), tuple((w,) for w in WIDTHS), ((4,), None, (6,))],
                         ids=["no bias", "biases", "some biases"])
def test_products_of_one_input_become_one_with_the_same_results(biases):
    before = model(biases)
    after = fused(before)
    assert matmuls(after) == 1
    assert sum(n.op_type == "Add" for n in after.graph.node) == (1 if all(biases) else sum(map(bool, biases)))
    ours, reference = run(after), run(before)
    assert ours.keys() == reference.keys()
    for name in reference:
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-6, atol=1e-6)


def test_biases_that_broadcast_stay_with_their_products():
    before = model(((1,), (1,), (1,)))
    after = fused(before)
    assert sum(n.op_type == "Add" for n in after.graph.node) == 3  # the product is fused, each bias added after
    ours, reference = run(after), run(before)
    for name in reference:
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("biases", [(None, None, None), tuple((w,) for w in WIDTHS)], ids=["no bias", "biases"])
def test_products_that_are_graph_outputs_are_left_alone(biases):
    before = model(biases, outputs_from="product")
    after = fused(before)
    assert matmuls(after) == 3
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    ours, reference = run(after), run(before)
    for name in reference:
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-6, atol=1e-6)
