"""``ort-cpu-qdq``: ort-cpu with weights in the standard ONNX Q/DQ form instead of ``MatMulNBits``.

Quantized weights are ``DequantizeLinear(codes, scales, block_size=32)`` feeding the original ``MatMul``
(ONNX opset 21+ blocked quantization; :mod:`~ember.compiler.passes.quantize_matmuls_qdq`): the form other
engines (TensorRT's weight-only INT4/INT8, other runtimes) import. onnxruntime fuses the pattern back into
``MatMulNBits`` when it loads the model (at ``accuracy_level`` 4 unless the session says otherwise), so on
this target it runs as fast as ort-cpu's own form; the artifact is the portable one. Only encodings whose
blocks DequantizeLinear expresses exactly: ``q8_0`` and ``q4_0`` (a GGUF's own Q8_0 / Q4_0 blocks are kept
as they are); Q4_1's float block minima have no DQ form.
"""
from __future__ import annotations

import dataclasses

from ..passes.cleanup import remove_unused
from ..passes.quantize_matmuls import weight_packer
from ..passes.quantize_matmuls_qdq import quantize_matmuls_qdq
from .ort_cpu import ORT_CPU

ORT_CPU_QDQ = dataclasses.replace(
    ORT_CPU,
    name="ort-cpu-qdq",
    description="onnxruntime, CPU execution provider; quantized weights as standard DequantizeLinear + MatMul",
    encodings=("float32", "q8_0", "q4_0"),
    encoding_passes={"q8_0": (quantize_matmuls_qdq(weight_packer(8, ("Q8_0",))), remove_unused),
                     "q4_0": (quantize_matmuls_qdq(weight_packer(4, ("Q4_0",))), remove_unused)},
    # onnxruntime 1.32 fails to load DequantizeLinear + MatMul in an If branch whose weights are the outer graph's
    # ("TransposeDQWeightsForMatMulNBits Missing required weight"): no decode slots' graph here
    loads_in_branches=False,
)
