"""Inline model-local functions (``use_subgraphs``' blocks, ``graphs/ir/subgraphs.py``) back into the main graph.

The first of all passes: quantization and the attention lowerings look at nodes and their weights in the main
graph, and the manifest records lowerings per node name. So each call of a block function becomes its block again
under that block's own names (``/model/layers.7/self_attn/q_proj/MatMul``, not the body's layer-0 names that
onnx_ir's ``InlinePass`` would number ``_2``, ``_3``, ...), reading the very weight values the call read (lazy
tensors stay unloaded). Functions ember did not make are left to ``InlinePass``.
"""
from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass

from ember.graphs.ir.subgraphs import BLOCKS_DOMAIN, SCOPE_KEY, rescope

logger = logging.getLogger(__name__)


def inline_functions(model: ir.Model) -> ir.Model:
    """``model`` with no model-local functions: every call in the main graph replaced by the function's nodes."""
    if not model.functions:
        return model
    calls = 0
    for node in list(model.graph):
        function = model.functions.get(node.op_identifier())
        if function is not None and function.domain == BLOCKS_DOMAIN:
            _inline_block(model.graph, node, function)
            calls += 1
    for identifier in [i for i in model.functions if i[0] == BLOCKS_DOMAIN]:
        del model.functions[identifier]
    model.graph.opset_imports.pop(BLOCKS_DOMAIN, None)
    logger.debug("inlined %d block calls", calls)
    if model.functions:
        InlinePass()(model)
    return model


def _inline_block(graph: ir.Graph, call: ir.Node, function: ir.Function) -> None:
    """Put a fresh copy of ``function``'s nodes where ``call`` is, named under the call's scope."""
    if len(call.inputs) != len(function.inputs) or len(call.outputs) != len(function.outputs):
        raise ValueError(f"{call.name} calls {function.name} with {len(call.inputs)} inputs and {len(call.outputs)} "
                         f"outputs; it has {len(function.inputs)} and {len(function.outputs)}")
    body = function.clone()
    body_scope = function.metadata_props.get(SCOPE_KEY, "")
    nodes = list(body)
    body.remove(nodes, safe=False)
    for parameter, argument in zip(list(body.inputs), call.inputs):
        for user, index in list(parameter.uses()):
            user.replace_input_with(index, argument)
    results = list(body.outputs)
    body.inputs.clear()
    body.outputs.clear()
    call_scope = call.name or ""
    if body_scope and call_scope:
        for node in nodes:
            node.name = rescope(node.name, body_scope, call_scope)
            for value in node.outputs:
                value.name = rescope(value.name, body_scope, call_scope)
    for old, new in zip(call.outputs, results):
        new.name, old.name = old.name, None
        new.type = old.type if old.type is not None else new.type
        new.shape = old.shape if old.shape is not None else new.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.insert_after(call, nodes)
    graph.remove(call, safe=True)
