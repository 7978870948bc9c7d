"""Rewrite ``RotaryEmbedding`` (ai.onnx 23) as Gather, Slice and elementwise ops, for engines that lack it.

``explicit_attention.rotate`` emits the opset-23 op (any head size, onnxruntime runs it). TensorRT's ONNX parser
(10.1: opsets 9-20, ``tensorrt_support``) has no importer for it, so the ``tensorrt`` target rewrites each node into
ops the parser takes, with the op's own meaning (the ONNX reference, ``onnx/reference/ops/op_rotary_embedding.py``):

* ``cos = Gather(cos_cache, position_ids)`` ``[batch, seq, rotary_dim / 2]`` (sin alike; without ``position_ids``
  the caches already are per token), unsqueezed to broadcast over the heads. The gathers depend only on the tables
  and the positions, so each pair is made once per graph and shared by every layer's q and k.
* ``x`` is seen per head (``[batch, seq, heads, head_size]`` for the 3-D form with ``num_heads``; the 4-D form is
  ``[batch, heads, seq, head_size]``); its first ``rotary_dim`` features are split into ``x1``, ``x2`` (halves, or
  even / odd features when ``interleaved``), rotated ``x1 * cos - x2 * sin``, ``x2 * cos + x1 * sin``, put back
  (concatenated, or interleaved by Unsqueeze + Concat + Reshape) and followed by the features past
  ``rotary_dim`` unchanged.

Positions are already clamped to the table by the lowering that emitted the node (``rotary_positions``), so the
Gather cannot index past it.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import input_at, nodes_of, replace_node

FORM = "Gather + Slice + Mul/Add + Concat"
_END = np.iinfo(np.int64).max


class _Builder:
    """The nodes of one graph's rewrite: constants as initializers (one per value), gathered tables shared."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.tape = ir.tape.Tape()
        self._constants: dict[tuple, ir.Value] = {}
        self._tables: dict[tuple[int, int, int, int], tuple[ir.Value, ir.Value]] = {}

    def const(self, array) -> ir.Value:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"/model/rotary/const_{len(self._constants)}"
            while name in self.model.graph.initializers:
                name += "_"
            tensor = ir.tensor(array, name=name)
            value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype),
                             shape=ir.Shape(tensor.shape.numpy()))
            self.model.graph.register_initializer(value)
            self._constants[key] = value
        return self._constants[key]

    def op(self, *args, **kwargs) -> ir.Value:
        return self.tape.op(*args, **kwargs)

    def tables(self, cos: ir.Value, sin: ir.Value, positions: ir.Value | None,
               head_axis: int) -> tuple[ir.Value, ir.Value]:
        """cos and sin per token, with a unit axis at ``head_axis`` to broadcast over the heads."""
        key = (id(cos), id(sin), id(positions), head_axis)
        if key not in self._tables:
            gathered = []
            for which, table in (("cos", cos), ("sin", sin)):
                per_token = table if positions is None else self.op("Gather", [table, positions], {"axis": 0})
                gathered.append(self.op("Unsqueeze", [per_token, self.const(np.array([head_axis], np.int64))],
                                        name=f"/model/rotary/{which}_{len(self._tables)}"))
            cos_t, sin_t = gathered
            self._tables[key] = (cos_t, sin_t)
        return self._tables[key]

    def slice(self, x: ir.Value, start: int, end: int, step: int = 1) -> ir.Value:
        return self.op("Slice", [x, self.const(np.array([start], np.int64)), self.const(np.array([end], np.int64)),
                                 self.const(np.array([-1], np.int64)), self.const(np.array([step], np.int64))])


def _attribute(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _rewrite(node: ir.Node, b: _Builder) -> ir.Value:
    x, cos, sin = input_at(node, 0), input_at(node, 1), input_at(node, 2)
    positions = node.inputs[3] if len(node.inputs) > 3 else None  # optional: without it the caches are per token
    interleaved = _attribute(node, "interleaved", 0)
    num_heads = _attribute(node, "num_heads", 0)
    half = cos.shape[-1] if cos.shape is not None else None
    if not isinstance(half, int):
        raise ValueError(f"{node.name}: RotaryEmbedding's cos_cache needs a static last dimension, got {cos.shape}")
    rotary_dim = _attribute(node, "rotary_embedding_dim", 0) or 2 * half
    three_d = x.shape is not None and len(x.shape) == 3
    if three_d and num_heads <= 0:
        raise ValueError(f"{node.name}: a 3-D RotaryEmbedding input needs num_heads")
    head_size = None
    if x.shape is not None and isinstance(x.shape[-1], int):
        head_size = x.shape[-1] // num_heads if three_d else x.shape[-1]
    op, const = b.op, b.const
    heads = op("Reshape", [x, const(np.array([0, 0, num_heads, -1], np.int64))]) if three_d else x
    cos_t, sin_t = b.tables(cos, sin, positions, 2 if three_d else 1)
    if interleaved:
        x1, x2 = b.slice(heads, 0, rotary_dim, 2), b.slice(heads, 1, rotary_dim, 2)
    else:
        x1, x2 = b.slice(heads, 0, rotary_dim // 2), b.slice(heads, rotary_dim // 2, rotary_dim)
    real = op("Sub", [op("Mul", [x1, cos_t]), op("Mul", [x2, sin_t])])
    imag = op("Add", [op("Mul", [x2, cos_t]), op("Mul", [x1, sin_t])])
    if interleaved:
        last = const(np.array([-1], np.int64))
        pairs = op("Concat", [op("Unsqueeze", [real, last]), op("Unsqueeze", [imag, last])], {"axis": -1})
        rotated = op("Reshape", [pairs, const(np.array([0, 0, 0, rotary_dim], np.int64))])
    else:
        rotated = op("Concat", [real, imag], {"axis": -1})
    if head_size is None or head_size > rotary_dim:
        rotated = op("Concat", [rotated, b.slice(heads, rotary_dim, _END)], {"axis": -1})
    if three_d:
        rotated = op("Reshape", [rotated, const(np.array([0, 0, -1], np.int64))])
    return rotated


def decompose_rotary(model: ir.Model) -> ir.Model:
    """Replace every ``RotaryEmbedding`` of the main graph by standard ops of opset <= 20 (see the module doc)."""
    builder = _Builder(model)
    for node in nodes_of(model, "RotaryEmbedding"):
        builder.tape = ir.tape.Tape()
        output = _rewrite(node, builder)
        output_name = node.outputs[0].name
        replace_node(model, node, list(builder.tape.nodes), [output])
        for i, new in enumerate(builder.tape.nodes):
            new.name = new.name or f"{output_name}/{new.op_type}_{i}"
    return model
