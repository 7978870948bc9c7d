"""Rewrite ``RMSNormalization`` (ai.onnx 23) as the function body the ONNX standard defines for it.

Layers emit ``RMSNormalization`` (``graphs/ir/ops.rms_norm``); onnxruntime runs it, TensorRT's ONNX parser (10.1:
opsets 9-20, ``tensorrt_support``) has no importer for it. The op is an ONNX function, so its body is its meaning:
``x`` (cast to ``stash_type``, float32 by default) ``/ Sqrt(ReduceMean(x * x, axes) + epsilon)``, cast back to
``x``'s type, ``* scale``, with ``axes`` = ``axis`` .. the last axis. The rewrite emits exactly that body (Mul,
ReduceMean with constant ``axes``, Add, Sqrt, Div, Mul; Casts only where ``x`` is not already the stash type), all
in TensorRT's table. TensorRT may fuse the pattern back into a normalization layer; its numbers are its own.

In a half encoding, run this after the precision pass, so that the statistics stay in ``stash_type``.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import input_at, nodes_of, replace_node

FORM = "Mul + ReduceMean + Add + Sqrt + Div + Mul"


def _axes(node: ir.Node, x: ir.Value) -> list[int]:
    attr = node.attributes.get("axis")
    axis = -1 if attr is None else int(attr.value)
    if axis == -1:
        return [-1]
    if x.shape is None:
        raise ValueError(f"{node.name}: RMSNormalization over axis {axis} needs the input's rank")
    rank = len(x.shape)
    return list(range(axis % rank, rank))


def decompose_rms_norm(model: ir.Model) -> ir.Model:
    """Replace every ``RMSNormalization`` of the main graph by its ONNX function body (see the module doc)."""
    constants: dict[tuple, ir.Value] = {}

    def const(array: np.ndarray) -> ir.Value:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in constants:
            name = f"/model/rms_norm/const_{len(constants)}"
            tensor = ir.tensor(array, name=name)
            value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype),
                             shape=ir.Shape(tensor.shape.numpy()))
            model.graph.register_initializer(value)
            constants[key] = value
        return constants[key]

    for node in nodes_of(model, "RMSNormalization"):
        x, scale = input_at(node, 0), input_at(node, 1)
        epsilon = node.attributes.get("epsilon")
        stash = node.attributes.get("stash_type")
        stash_type = ir.DataType(1 if stash is None else int(stash.value))
        dtype = x.dtype or stash_type  # an untyped input is taken to be the stash type (no casts)
        tape, prefix = ir.tape.Tape(), node.name or node.outputs[0].name
        xs = x if dtype == stash_type else tape.op("Cast", [x], {"to": stash_type}, name=f"{prefix}/stash")
        mean_square = tape.op("ReduceMean", [tape.op("Mul", [xs, xs], name=f"{prefix}/square"),
                                             const(np.array(_axes(node, x), np.int64))],
                              {"keepdims": 1}, name=f"{prefix}/mean_square")
        eps = np.array(1e-5 if epsilon is None else epsilon.value, dtype=stash_type.numpy())
        rms = tape.op("Sqrt", [tape.op("Add", [mean_square, const(eps)], name=f"{prefix}/add_epsilon")],
                      name=f"{prefix}/rms")
        normalized = tape.op("Div", [xs, rms], name=f"{prefix}/normalize")
        if dtype != stash_type:
            normalized = tape.op("Cast", [normalized], {"to": dtype}, name=f"{prefix}/unstash")
        output = tape.op("Mul", [normalized, scale], name=f"{prefix}/scale")
        replace_node(model, node, list(tape.nodes), [output])
    return model
