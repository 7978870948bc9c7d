"""``w8a8``: int8 weights and int8 activations for compute-bound encoders (``com.microsoft.DynamicQuantizeMatMul``).

An encoder runs every weight MatMul on hundreds of tokens at once, so unlike decoding it is bound by
arithmetic, not by weight bytes: 4-bit ``MatMulNBits`` does not help it (on this AVX2 CPU without VNNI its
int8 kernel at M = 960 runs at 65 GOP/s against float32 MLAS GEMM's 89 GFLOP/s). onnxruntime's
``DynamicQuantizeMatMul`` quantizes the activations to uint8 at run time (one scale and zero point per
tensor) and multiplies them with int8 weights in its integer GEMM: 140 GOP/s on all-MiniLM-L6-v2's shapes
(960 x 384 x 1536, 2 threads, onnxruntime 1.31), 1.3-1.6x float32.

The price is accuracy and batch independence: one activation scale per tensor means a token's result
depends (slightly) on the other tokens of its batch, and outlier channels cost the rest precision.
Measured on all-MiniLM-L6-v2 (1,024 sentences): min cosine 0.986, mean 0.992 against float32. What was
tried and not kept: SmoothQuant-style per-channel scale migration (alpha 0.5 / 0.7 / 0.85: min cosine
0.965 / 0.990 / 0.984, calibration at compile time for no clear gain), leaving the feed-forward output
projections in float (min 0.991, a third of the speed-up gone).

Each ``MatMul`` with a constant float ``[K, N]`` weight becomes ``DynamicQuantizeMatMul(x, codes, scales)``
(per-output-channel symmetric int8, :mod:`~ember.compiler.quantization.int8_channels`), taking in the bias
``Add`` that follows it where there is one; the codes are computed when the artifact is written.

Any shape: the kernel takes any K and N (``tests/compiler/quantization/test_any_shape.py``), so nothing is
padded and no weight stays float; it has no limit this form meets, hence no rejection check. Its integer product
depends on the CPU: on x86 with AVX2 but no VNNI (this machine, onnxruntime 1.32) the u8 x s8 kernel
(``vpmaddubsw``) saturates each sum of two neighbouring products at int16, so where activations near the top of
their range meet weight codes near +-127 an output leaves the exact product (random activations: by up to
29 % of the output's largest value). Trained activations, whose range outliers set, seldom get there: 7-bit codes
(+-63, which cannot saturate; onnxruntime's ``reduce_range``) gave all-MiniLM-L6-v2 a min / mean cosine against
float32 of 0.970 / 0.9919 over 218 sentences where 8-bit codes give 0.975 / 0.9922, so the codes keep 8 bits.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.versions import MS_DOMAIN, MS_OPSET

from ..quantization.int8_channels import quantize_per_channel
from .base import nodes_of
from .quantize_matmuls_qdq import float_matrix, lazy_initializer, weight_tensor

logger = logging.getLogger(__name__)


def _bias_add(graph: ir.Graph, matmul: ir.Node, n: int) -> tuple[ir.Node, ir.Value] | None:
    """``(add, bias)`` when the MatMul's only use is ``Add(product, bias)`` with a constant float ``bias [N]``
    (and its product is not one of ``graph``'s outputs)."""
    uses = list(matmul.outputs[0].uses())
    if len(uses) != 1 or any(v is matmul.outputs[0] for v in graph.outputs):
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None
    bias = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
    tensor = bias.const_value if bias is not None else None
    if bias is None or tensor is None or tuple(tensor.shape) != (n,) or tensor.dtype != ir.DataType.FLOAT:
        return None
    return add, bias


def _part(quantized: Callable[[], tuple[np.ndarray, np.ndarray]], i: int) -> Callable[[], np.ndarray]:
    """``quantized()[i]`` when called (the codes or the scales, computed when the artifact is written)."""
    return lambda: quantized()[i]


def quantize_matmuls_w8a8(model: ir.Model) -> ir.Model:
    graph = model.graph
    count = 0
    for node in nodes_of(model, "MatMul"):
        matmul, weight_value = node, node.inputs[1]
        if not float_matrix(weight_value):
            continue
        weight = weight_tensor(weight_value)
        k, n = weight.shape.numpy()
        quantized = functools.cache(lambda w=weight: quantize_per_channel(w.numpy()))
        codes = lazy_initializer(graph, f"{weight_value.name}.w8", ir.DataType.INT8, (k, n), _part(quantized, 0))
        scales = lazy_initializer(graph, f"{weight_value.name}.w8_scales", ir.DataType.FLOAT, (n,), _part(quantized, 1))
        inputs = [node.inputs[0], codes, scales]
        bias_add = _bias_add(graph, node, n)
        if bias_add is not None:  # the kernel adds the bias: one node less on the whole batch
            node, bias = bias_add
            inputs += [None, bias]
        old = node.outputs[0]
        out = ir.Value(name=f"{node.name}/DynamicQuantizeMatMul_output_0", shape=old.shape, type=old.type)
        graph.insert_before(node, [ir.Node(MS_DOMAIN, "DynamicQuantizeMatMul", inputs,
                                           outputs=[out], name=f"{node.name}/DynamicQuantizeMatMul")])
        is_output = any(v is old for v in graph.outputs)
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        if is_output:
            output_name, old.name = old.name, None
            out.name = output_name
        graph.remove(node, safe=True)
        if bias_add is not None:
            graph.remove(matmul, safe=True)
        count += 1
    if count:
        graph.opset_imports[MS_DOMAIN] = MS_OPSET
        logger.info("w8a8: %d MatMuls -> DynamicQuantizeMatMul", count)
    return model
