"""Rewrite ONNX ``Attention`` (ai.onnx 23, the encoders' self-attention) as the standard ops that compute it.

The encoder layers emit ``Attention`` on 3-D ``[batch, seq, heads * head_dim]`` inputs with an additive (float) or
selecting (bool) mask and no KV cache (``graphs/ir/ops.scaled_dot_product_attention``). onnxruntime runs it;
TensorRT's 10.1 ONNX parser (opsets 9-20, ``targets/tensorrt_support``) has no importer for it. The op's meaning,
from its specification, for that use:

    Q, K, V -> [batch, heads, seq, head_dim]                 (Reshape [0, 0, heads, head_dim], Transpose 0 2 1 3)
    scores  = (Q @ K^T) * scale                               (scale: the attribute, else 1 / sqrt(head_dim))
    scores  = scores + mask     | Where(mask, scores, lowest) (float mask | bool mask)
    probs   = Softmax(scores, axis=-1)                        (in float32 when ``softmax_precision`` says so)
    output  = probs @ V -> [batch, seq, heads * head_dim]     (Transpose 0 2 1 3, Reshape [0, 0, -1])

What this rewrite does not cover is refused with the node named, not approximated: a KV cache (past inputs or
present outputs used), ``is_causal``, ``softcap``, a ``qk_matmul_output_mode`` other than 0, 4-D inputs, or
grouped KV heads (encoders have none). In a half encoding run it after the precision pass: ``softmax_precision``
(which ``convert_to_half`` sets) then keeps the softmax in float32 here too.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import input_at, nodes_of, replace_node, static_dim

FORM = "Reshape + Transpose + MatMul + Mul + Add + Softmax + MatMul"


def _int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _refuse_unsupported(node: ir.Node) -> tuple[int, int]:
    """(heads, head_dim) of an Attention node this rewrite covers; a ValueError naming what it does not."""
    name = node.name or node.outputs[0].name
    problems = [f"{attr}={_int_attr(node, attr)}" for attr in ("is_causal", "qk_matmul_output_mode")
                if _int_attr(node, attr)]
    softcap = node.attributes.get("softcap")
    if softcap is not None and float(softcap.value) != 0.0:
        problems.append(f"softcap={softcap.value}")
    if any(v is not None for v in node.inputs[4:]) or any(o.uses() for o in node.outputs[1:]):
        problems.append("a KV cache (past inputs or present outputs)")
    heads, kv_heads = _int_attr(node, "q_num_heads"), _int_attr(node, "kv_num_heads")
    query = input_at(node, 0)
    if query.shape is None or len(query.shape) != 3 or not isinstance(query.shape[2], int) or not heads:
        problems.append("inputs that are not 3-D [batch, seq, heads * head_dim] with q_num_heads")
    elif kv_heads != heads:
        problems.append(f"{kv_heads} KV heads for {heads} query heads")
    if problems:
        raise ValueError(f"Attention node {name!r}: the standard-op rewrite does not cover {', '.join(problems)}")
    return heads, static_dim(query, 2) // heads


def decompose_attention(model: ir.Model) -> ir.Model:
    """Replace every main-graph ``Attention`` by the standard ops of its specification (see the module doc)."""
    constants: dict[tuple, ir.Value] = {}

    def const(array: np.ndarray) -> ir.Value:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in constants:
            name = f"/model/attention/const_{len(constants)}"
            tensor = ir.tensor(array, name=name)
            value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype),
                             shape=ir.Shape(tensor.shape.numpy()))
            model.graph.register_initializer(value)
            constants[key] = value
        return constants[key]

    for node in nodes_of(model, "Attention"):
        heads, head_dim = _refuse_unsupported(node)
        query, key, value = input_at(node, 0), input_at(node, 1), input_at(node, 2)
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        dtype = query.dtype or ir.DataType.FLOAT
        scale_attr = node.attributes.get("scale")
        scale = float(scale_attr.value) if scale_attr is not None else 1.0 / float(np.sqrt(head_dim))
        softmax_type = ir.DataType(_int_attr(node, "softmax_precision") or dtype)
        tape, prefix = ir.tape.Tape(), node.name or node.outputs[0].name
        split = const(np.array([0, 0, heads, head_dim], np.int64))

        def heads_first(x: ir.Value, perm: list[int], what: str) -> ir.Value:
            return tape.op("Transpose", [tape.op("Reshape", [x, split], name=f"{prefix}/{what}_heads")],
                           {"perm": perm}, name=f"{prefix}/{what}_transpose")

        q = heads_first(query, [0, 2, 1, 3], "q")
        k_t = heads_first(key, [0, 2, 3, 1], "k")  # [batch, heads, head_dim, seq]: K transposed for Q @ K^T
        v = heads_first(value, [0, 2, 1, 3], "v")
        scores = tape.op("Mul", [tape.op("MatMul", [q, k_t], name=f"{prefix}/qk"), const(np.array(scale, dtype.numpy()))],
                         name=f"{prefix}/scale")
        if softmax_type != dtype:
            scores = tape.op("Cast", [scores], {"to": softmax_type}, name=f"{prefix}/softmax_in")
        if mask is not None:
            if mask.dtype == ir.DataType.BOOL:
                lowest = const(np.array(np.finfo(softmax_type.numpy()).min, softmax_type.numpy()))
                scores = tape.op("Where", [mask, scores, lowest], name=f"{prefix}/mask")
            else:
                if mask.dtype is not None and mask.dtype != softmax_type:
                    mask = tape.op("Cast", [mask], {"to": softmax_type}, name=f"{prefix}/mask_cast")
                scores = tape.op("Add", [scores, mask], name=f"{prefix}/mask")
        probs = tape.op("Softmax", [scores], {"axis": -1}, name=f"{prefix}/softmax")
        if softmax_type != dtype:
            probs = tape.op("Cast", [probs], {"to": dtype}, name=f"{prefix}/softmax_out")
        context = tape.op("Transpose", [tape.op("MatMul", [probs, v], name=f"{prefix}/pv")], {"perm": [0, 2, 1, 3]},
                          name=f"{prefix}/context_transpose")
        output = tape.op("Reshape", [context, const(np.array([0, 0, heads * head_dim], np.int64))],
                         name=f"{prefix}/context")
        replace_node(model, node, list(tape.nodes), [output])
    return model
