"""Single-operation ONNX models around a :class:`~.matmul_nbits.PackedWeight` (tests and benchmarks).

Built with ``onnx.helper``; the weights are initializers, so onnxruntime can prepack them. Every model
has one float32 input ``A [M, K]`` (M symbolic) and one output ``Y [M, N]``.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .matmul_nbits import PackedWeight

__all__ = ["matmul_model", "matmul_nbits_model", "q4_1_split_model"]

OPSET = 21
IR_VERSION = 10


def _model(nodes, inits, k: int, n: int, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        inits)
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION)


def _nbits_node(packed: PackedWeight, accuracy_level: int, output: str,
                prefix: str = "") -> tuple[onnx.NodeProto, list]:
    inits = [numpy_helper.from_array(packed.b, prefix + "B"),
             numpy_helper.from_array(packed.scales.astype(np.float32), prefix + "scales")]
    inputs = ["A", prefix + "B", prefix + "scales"]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points, prefix + "zero_points"))
        inputs.append(prefix + "zero_points")
    node = helper.make_node("MatMulNBits", inputs, [output], domain="com.microsoft")
    # The attributes as make_node(**attributes) adds them (sorted by name), added explicitly: an unpacked dict of
    # ints does not type-check against make_node's own keywords (name, doc_string: str | None).
    node.attribute.extend(helper.make_attribute(key, value)
                          for key, value in sorted(packed.attributes(accuracy_level).items()))
    return node, inits


def matmul_nbits_model(packed: PackedWeight, accuracy_level: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """``Y = MatMulNBits(A, B, scales[, zero_points])``."""
    node, inits = _nbits_node(packed, accuracy_level, "Y")
    return _model([node], inits, packed.k, packed.n, opset)


def matmul_model(weight: np.ndarray, opset: int = OPSET) -> onnx.ModelProto:
    """``Y = MatMul(A, W.T)`` for a float weight ``W [N, K]`` (the float32 baseline)."""
    w = np.ascontiguousarray(np.asarray(weight, np.float32).T)
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    return _model([node], [numpy_helper.from_array(w, "W")], w.shape[0], w.shape[1], opset)


def q4_1_split_model(packed: PackedWeight, mins: np.ndarray, accuracy_level: int = 0,
                     opset: int = OPSET) -> onnx.ModelProto:
    """``Y = MatMulNBits(A; d, q, zp 0) + blocksum(A) @ mins.T`` (see :func:`.matmul_nbits.q4_1_split`)."""
    n, kb, bs = packed.n, packed.k_blocks, packed.block_size
    node, inits = _nbits_node(packed, accuracy_level, "dq")
    inits += [numpy_helper.from_array(np.array([-1, kb, bs], np.int64), "blocks_shape"),
              numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
              numpy_helper.from_array(np.ascontiguousarray(np.asarray(mins, np.float32).reshape(n, kb).T), "mins_t")]
    nodes = [node,
             helper.make_node("Reshape", ["A", "blocks_shape"], ["A_blocks"]),
             helper.make_node("ReduceSum", ["A_blocks", "last_axis"], ["A_sums"], keepdims=0),
             helper.make_node("MatMul", ["A_sums", "mins_t"], ["offsets"]),
             helper.make_node("Add", ["dq", "offsets"], ["Y"])]
    return _model(nodes, inits, packed.k, n, opset)
