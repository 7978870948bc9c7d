"""Run an integer ``CumSum`` in float32 and cast back: TensorRT's parser takes CumSum on float types only.

RoBERTa-style encoders number positions with ``CumSum`` over the (int64) attention mask. TensorRT 10.1's ONNX
parser imports CumSum for FLOAT, FLOAT16 and BFLOAT16 (``targets/tensorrt_support``). A running count of 0/1 values
is exact in float32 up to 2**24 (16.7 M tokens in one row), far past any model's positions, so ``Cast(float32) ->
CumSum -> Cast(back)`` has the same result. Run after a precision pass (float16 would be exact only to 2048).
"""
from __future__ import annotations

import onnx_ir as ir

from .base import input_at, nodes_of, replace_node

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def cumsum_in_float(model: ir.Model) -> ir.Model:
    """Rewrite every main-graph ``CumSum`` on an integer input as a float32 one between two Casts."""
    for node in nodes_of(model, "CumSum"):
        x, axis = input_at(node, 0), input_at(node, 1)
        if x.dtype is None or x.dtype in FLOAT_TYPES:
            continue
        tape, prefix = ir.tape.Tape(), node.name or node.outputs[0].name
        as_float = tape.op("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{prefix}/to_float")
        summed = tape.op("CumSum", [as_float, axis], dict(node.attributes.items()), name=f"{prefix}/float")
        output = tape.op("Cast", [summed], {"to": x.dtype}, name=f"{prefix}/back")
        replace_node(model, node, list(tape.nodes), [output])
    return model
