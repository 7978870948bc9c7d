"""Fuse ``RMSNormalization(Add(a, b))`` into ``com.microsoft.SkipSimplifiedLayerNormalization``.

Every pre-norm block adds a residual and normalizes the sum; the fused kernel does both in one pass over
the activations and also returns the sum, which the next residual connection reads.
"""
from __future__ import annotations

import onnx_ir as ir

from ember.graphs.ir.versions import MS_DOMAIN, MS_OPSET

from .base import input_at, nodes_of


def fuse_skip_rms_norm(model: ir.Model) -> ir.Model:
    graph = model.graph
    fused = False
    graph_outputs = set(id(v) for v in graph.outputs)
    for norm in nodes_of(model, "RMSNormalization"):
        add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
        axis = norm.attributes.get("axis")
        if add is None or add.op_type != "Add" or add.domain != "" or (axis is not None and axis.value != -1):
            continue
        if id(add.outputs[0]) in graph_outputs or id(norm.outputs[0]) in graph_outputs:
            continue
        a, b = input_at(add, 0), input_at(add, 1)
        if a.shape is None or b.shape is None or list(a.shape) != list(b.shape):
            continue  # the kernel wants input and skip of one shape
        epsilon = norm.attributes["epsilon"].value if "epsilon" in norm.attributes else 1e-5
        outputs = [ir.Value(name=f"{norm.name}/SkipSimplifiedLayerNormalization_output_{i}") for i in range(4)]
        new = ir.Node(MS_DOMAIN, "SkipSimplifiedLayerNormalization", [a, b, norm.inputs[1]],
                      [ir.AttrFloat32("epsilon", float(epsilon))], outputs=outputs,
                      name=f"{norm.name}/SkipSimplifiedLayerNormalization")
        for new_value, old_value in ((outputs[0], norm.outputs[0]), (outputs[3], add.outputs[0])):
            new_value.shape, new_value.type = old_value.shape, old_value.type
        outputs[1].type = outputs[2].type = ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(add, new)
        ir.convenience.replace_all_uses_with(norm.outputs[0], outputs[0])
        ir.convenience.replace_all_uses_with(add.outputs[0], outputs[3])
        graph.remove([norm, add], safe=True)
        fused = True
    if fused:
        graph.opset_imports[MS_DOMAIN] = MS_OPSET
    return model
