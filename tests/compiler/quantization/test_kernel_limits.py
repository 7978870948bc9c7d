"""The quantized kernels' limits (issue 10): each of ember's rejection checks (a node it rejects stays float32,
recorded in the lowering record) against onnxruntime's kernel itself. The findings: ``any_shape.py``.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ember.compiler.passes.lowering_record import recorded_lowerings
from ember.compiler.passes.quantize_embedding import gather_block_quantized_rejection, quantize_embedding
from ember.compiler.passes.quantize_matmuls import matmul_nbits_rejection, quantize_matmuls
from ember.compiler.passes.quantize_matmuls_qdq import PackSpec, dequantize_linear_rejection, rtn_packer

from .any_shape import VOCAB, op_types, rng, run
from .test_quantize_embedding import tied_model
from .test_quantize_matmuls_qdq import two_layer_model


def _onnx_model(nodes, inits, inputs, opset: int = 21) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=imports, ir_version=10).SerializeToString()


def _runs(model: bytes, feeds: dict) -> bool:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception:  # noqa: BLE001 -- onnxruntime raises several types; any of them is the kernel refusing
        return False
    return True


def _zero_points(kind: str | None, shape: tuple[int, ...], name: str = "Z") -> list:
    if kind == "uint8":
        return [numpy_helper.from_array(np.full(shape, 1, np.uint8), name)]
    if kind == "float":
        return [numpy_helper.from_array(np.full(shape, 1.0, np.float32), name)]
    return []


SPECS = [PackSpec(bits, block, zp) for bits in (2, 3, 4, 8) for block in (8, 16, 24, 32, 64)
         for zp in (None, "uint8", "float")]


def test_matmul_nbits_rejection_is_the_kernels():
    """For every bits / block size / zero-point kind, ``matmul_nbits_rejection`` accepts exactly what the kernel
    runs (K = 40: a partial last block whatever the block size; N = 9)."""
    k, n = 40, 9
    x = rng(7).standard_normal((2, k)).astype(np.float32)
    disagree = []
    for spec in SPECS:
        kb = -(-k // spec.block_size)
        b = rng(8).integers(0, 256, (n, kb, max(1, spec.block_size * spec.bits // 8)), dtype=np.uint8)
        zp_shape = (n * ((kb * spec.bits + 7) // 8),) if spec.zero_points == "uint8" else (n * kb,)
        inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(np.full(n * kb, 0.01, np.float32), "S"),
                 *_zero_points(spec.zero_points, zp_shape)]
        node = helper.make_node("MatMulNBits", ["A", "B", "S"] + (["Z"] if spec.zero_points else []), ["Y"],
                                domain="com.microsoft", K=k, N=n, bits=spec.bits, block_size=spec.block_size,
                                accuracy_level=4)
        runs = _runs(_onnx_model([node], inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])]),
                     {"A": x})
        reason = matmul_nbits_rejection(spec)
        if runs != (reason is None):
            disagree.append((spec, runs, reason))
    assert disagree == []


def test_gather_block_quantized_rejection_is_the_kernels():
    """The same for the lookup's layout (B ``[N, k_blocks, block * bits / 8]``, one block per last-axis row), and
    for the index types (int16 indices have no kernel)."""
    k, n = 40, 11
    disagree = []
    for spec in SPECS:
        kb = -(-k // spec.block_size)
        data = rng(9).integers(0, 256, (n, kb, max(1, spec.block_size * spec.bits // 8)), dtype=np.uint8)
        scales = numpy_helper.from_array(np.full((n, kb, 1), 0.01, np.float32), "S")
        inits = [numpy_helper.from_array(data, "D"), scales, *_zero_points(spec.zero_points, (n, kb, 1))]
        for dtype, onnx_type in ((np.int64, TensorProto.INT64), (np.int32, TensorProto.INT32),
                                 (np.int16, TensorProto.INT16)):
            node = helper.make_node("GatherBlockQuantized", ["D", "ids", "S"] + (["Z"] if spec.zero_points else []),
                                    ["Y"], domain="com.microsoft", gather_axis=0, quantize_axis=2,
                                    block_size=spec.block_size, bits=spec.bits)
            ids_input = helper.make_tensor_value_info("ids", onnx_type, ["B"])
            runs = _runs(_onnx_model([node], inits, [ids_input]), {"ids": np.array([0, n - 1, 3], dtype)})
            ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType(onnx_type)), shape=ir.Shape(["B"]))
            reason = gather_block_quantized_rejection(spec, ids)
            if runs != (reason is None):
                disagree.append((spec, dtype.__name__, runs, reason))
    assert disagree == []


def test_dequantize_linear_rejection_is_the_kernels():
    """Blocked DequantizeLinear + MatMul (K = 40, a short last block) for each opset, width and zero-point kind."""
    k, n, block = 40, 9, 32
    kb = -(-k // block)
    x = rng(10).standard_normal((2, k)).astype(np.float32)
    disagree = []
    for opset in (19, 21, 23):
        for bits in (4, 8):
            for zp in (None, "uint8", "float"):
                signed = zp is None
                code_type = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
                             (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}[bits, signed]
                codes = rng(11).integers(-8 if signed else 0, 8 if signed else 16, (k, n)).tolist()
                inits = [helper.make_tensor("Q", code_type, (k, n), np.ravel(codes).tolist()),
                         numpy_helper.from_array(np.full((kb, n), 0.01, np.float32), "S")]
                if zp == "uint8":
                    inits.append(helper.make_tensor("Z", code_type, (kb, n), [1] * (kb * n)))
                inits += _zero_points(zp, (kb, n)) if zp == "float" else []
                nodes = [helper.make_node("DequantizeLinear", ["Q", "S"] + (["Z"] if zp else []), ["W"], axis=0,
                                          block_size=block),
                         helper.make_node("MatMul", ["A", "W"], ["Y"])]
                inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])]
                runs = _runs(_onnx_model(nodes, inits, inputs, opset), {"A": x})
                reason = dequantize_linear_rejection(PackSpec(bits, block, zp), opset)
                if runs != (reason is None):
                    disagree.append((opset, bits, zp, runs, reason))
    assert disagree == []


def test_rejected_weights_stay_float_and_are_recorded(tmp_path):
    """A form no kernel takes (3-bit codes) leaves each weight a float32 product, each decision recorded, and the
    model runs as the float one does; a lookup whose indices have no known rank stays a float Gather."""
    model = two_layer_model(72, 64, vocab=VOCAB)
    x = rng(12).standard_normal((3, 72)).astype(np.float32)
    (h_float, logits_float), _ = run(model, tmp_path / "float", {"x": x})
    model = quantize_matmuls(3)(model)
    assert op_types(model) == ["MatMul", "Gemm"]
    reason = "MatMulNBits: bits must be 2, 4 or 8, not 3"
    assert [(r.node, r.op, r.form, r.rejected) for r in recorded_lowerings(model)] == [
        ("layer/MatMul", "MatMul", "MatMul (float32)", (reason,)),
        ("lm_head/Gemm", "Gemm", "Gemm (float32)", (reason,))]
    (h, logits), _ = run(model, tmp_path / "kept", {"x": x})
    assert np.array_equal(h, h_float) and np.array_equal(logits, logits_float)

    lookup = tied_model(72, vocab=VOCAB)
    lookup.graph.inputs[0].shape = None
    lookup = quantize_embedding(rtn_packer(4))(lookup)
    assert op_types(lookup) == ["Gather", "Gemm"]
    (record,) = recorded_lowerings(lookup)
    assert (record.node, record.form) == ("model.embed_tokens/Gather", "Gather (float32)")
    assert record.rejected == ("GatherBlockQuantized: the indices' rank is unknown (the lookup's Reshape needs it)",)


