"""Weight-only quantization: float MatMuls with constant weights -> ``com.microsoft.MatMulNBits``.

Decoding on a CPU is bound by the weight bytes read per token; 4-bit weights read 1/8 of float32's.
Each MatMul whose right operand is a constant ``[K, N]`` weight (after the q|k|v and gate|up fusions) and
the tied output projection (``Gemm(x, E, transB=1)``: ``E`` is already ``[N, K]``) are replaced by
MatMulNBits over round-to-nearest blockwise codes (:func:`~ember.compiler.quantization.quantize_rtn`,
symmetric, block 32). ``accuracy_level`` 4 (int8 activations inside the kernel) is the fast level for
both widths on onnxruntime's CPU kernels: measured in ``compiler/quantization/matmul_nbits.py``, 8-bit at
level 0 is 25-37x slower than float32 at decode, 4-bit level 4 is 2-4.5x faster. The embedding table
stays float (a lookup reads one row per token). Quantization runs when the artifact is written: the
packed arrays are lazy tensors computed once per weight.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.versions import MS_DOMAIN, MS_OPSET

from ..quantization.matmul_nbits import PackedWeight, quantize_rtn
from .base import Pass, nodes_of

ACCURACY_LEVEL = 4
BLOCK_SIZE = 32


def _lazy(name: str, dtype: ir.DataType, shape: tuple[int, ...], make) -> ir.Value:
    tensor = ir.LazyTensor(lambda: ir.tensor(make(), name=name), dtype=dtype, shape=ir.Shape(list(shape)), name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)), const_value=tensor)


def _packed_inputs(graph: ir.Graph, weight: ir.TensorProtocol, name: str, transposed: bool, bits: int):
    """Lazy ``B`` and ``scales`` initializers for a ``[K, N]`` (or, transposed, ``[N, K]``) float weight."""
    n, k = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    n, k = int(n), int(k)

    @functools.cache
    def packed() -> PackedWeight:
        array = weight.numpy()
        return quantize_rtn(np.ascontiguousarray(array if transposed else array.T), bits, BLOCK_SIZE, symmetric=True)

    k_blocks = -(-k // BLOCK_SIZE)
    b = _lazy(f"{name}.q{bits}", ir.DataType.UINT8, (n, k_blocks, BLOCK_SIZE * bits // 8), lambda: packed().b)
    scales = _lazy(f"{name}.scales", ir.DataType.FLOAT, (n * k_blocks,), lambda: packed().scales)
    graph.register_initializer(b)
    graph.register_initializer(scales)
    return b, scales, n, k


def quantize_matmuls(bits: int) -> Pass:
    """The pass for ``bits``-bit weights (4 or 8)."""

    def run(model: ir.Model) -> ir.Model:
        graph = model.graph
        candidates = [(node, False) for node in nodes_of(model, "MatMul")]
        candidates += [(node, True) for node in nodes_of(model, "Gemm")
                       if node.attributes.get("transB") is not None and node.attributes["transB"].value == 1
                       and len(node.inputs) == 2]
        changed = False
        for node, transposed in candidates:
            weight_value = node.inputs[1]
            weight = weight_value.const_value if weight_value is not None else None
            if weight is None or len(weight.shape) != 2 or weight.dtype != ir.DataType.FLOAT:
                continue
            b, scales, n, k = _packed_inputs(graph, weight, weight_value.name, transposed, bits)
            out = ir.Value(name=f"{node.name}/MatMulNBits_output_0")
            new = ir.Node(MS_DOMAIN, "MatMulNBits", [node.inputs[0], b, scales],
                          [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
                           ir.AttrInt64("block_size", BLOCK_SIZE), ir.AttrInt64("accuracy_level", ACCURACY_LEVEL)],
                          outputs=[out], name=f"{node.name}/MatMulNBits")
            old = node.outputs[0]
            out.shape, out.type = old.shape, old.type
            graph.insert_before(node, new)
            is_output = any(v is old for v in graph.outputs)
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            if is_output:  # the graph output keeps its name (``logits``)
                name, old.name = old.name, None
                out.name = name
            graph.remove(node, safe=True)
            changed = True
        if changed:
            graph.opset_imports[MS_DOMAIN] = MS_OPSET
        return model

    run.__name__ = f"quantize_matmuls_{bits}bit"
    return run
