"""Weight-only INT4 for TensorRT: ``quantize_matmuls_qdq``'s blocked ``DequantizeLinear`` + ``MatMul``, limited to
the weights TensorRT's ONNX parser reads as written.

The form is the standard one (``quantize_matmuls_qdq``: signed INT4 codes ``[K, N]``, blocks of 32 along K, no zero
point, float32 scales ``[ceil(K / 32), N]``), quantized by :func:`~.quantize_matmuls_qdq.rtn_packer` with
``positive_scales=True``: TensorRT's importer refuses a scale that is not strictly positive ("Scale coefficients
must all be positive", ``QuantDequantLinearHelper``), which ggml's signed Q4_0 scales are. So a GGUF's own Q4_0
blocks are not kept: their weights are requantized from the dequantized values (symmetric RTN, codes -7..7).

Weights the 10.1 parser would misread stay float32, recorded per node in the manifest:

* K not a multiple of 32: the parser ignores ``block_size`` and infers the block from the shapes
  (``K / ceil(K / 32)`` with integer division), which differs from ONNX's short last block;
* N odd: INT4 needs an even last dimension ("Quantization to INT4 is not supported for tensors with an odd last
  dimension").
"""
from __future__ import annotations

import onnx_ir as ir

from .base import Pass
from .quantize_matmuls_qdq import (BLOCK_SIZE, FORM, PackSpec, float_matrix, keep_float, quantize_matmuls_qdq,
                                   rtn_packer, tied_head, weight_tensor)


def tensorrt_int4_rejection(value: ir.Value, transposed: bool, block_size: int = BLOCK_SIZE) -> str | None:
    """Why TensorRT 10.1's parser would not read ``value`` (a MatMul's ``[K, N]`` weight, ``[N, K]`` when
    ``transposed``) as blocked INT4 with ``block_size``, or None."""
    rows, columns = weight_tensor(value).shape.numpy()
    n, k = (rows, columns) if transposed else (columns, rows)
    if k % block_size:
        return (f"K = {k} is not a multiple of {block_size}: TensorRT infers the block from the shapes "
                "(ignoring block_size), so a short last block would be read as a different block size")
    if n % 2:
        return f"N = {n} is odd: TensorRT's INT4 needs an even last dimension"
    return None


class _TensorRTPlan:
    """``rtn_packer(4, positive_scales=True)``'s plan, declining the weights TensorRT would misread."""

    def __init__(self):
        self.packer = rtn_packer(4, positive_scales=True)

    def __call__(self, value: ir.Value, transposed: bool) -> PackSpec | None:
        if tensorrt_int4_rejection(value, transposed, self.packer.block_size) is not None:
            return None
        return self.packer.spec(value, transposed)


def quantize_matmuls_int4_tensorrt() -> Pass:
    """The pass: weight MatMuls and the tied head -> INT4 ``DequantizeLinear`` + ``MatMul`` where TensorRT reads it
    as written; the others stay float32, each recorded with the reason."""
    plan = _TensorRTPlan()
    quantize = quantize_matmuls_qdq(plan.packer, plan=plan)

    def run(model: ir.Model) -> ir.Model:
        for node in list(model.graph):
            if node.domain != "" or not (node.op_type == "MatMul" or tied_head(node)):
                continue
            value = node.inputs[1]
            if float_matrix(value):
                reason = tensorrt_int4_rejection(value, node.op_type == "Gemm", plan.packer.block_size)
                if reason is not None:
                    keep_float(model, node, f"{FORM} (TensorRT INT4)", reason)
        return quantize(model)

    run.__name__ = "quantize_matmuls_int4_tensorrt"
    return run
