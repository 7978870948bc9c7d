"""Identical transformer blocks emitted once, as ONNX model-local functions (MAX's ``use_subgraphs``).

A decoder of 30 blocks holds 30 copies of the same nodes with different weights. With
``Transformer(use_subgraphs=True)`` each group of structurally identical blocks (the same ops, attributes and wiring;
``subgraph_layer_groups`` names the groups, else every set of identical blocks is one) becomes one function in
domain :data:`BLOCKS_DOMAIN`; each block is a call of it, its weights and every other value it reads from outside
passed as inputs. Blocks are found by their nodes' scope (``/model/layers.{i}/...``, :meth:`Graph.scope`).

The compiler inlines the functions again before it lowers (``compiler/passes/inline_functions.py``): its passes look
at MatMuls and their weights in the main graph. BENCHMARKS.md ("use_subgraphs") has what it saves.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import onnx_ir as ir

#: The domain of the block functions.
BLOCKS_DOMAIN = "ember.blocks"


def _layers(graph: ir.Graph, prefix: str) -> dict[int, list[ir.Node]]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)/")
    layers: dict[int, list[ir.Node]] = {}
    for node in graph:
        match = pattern.match(node.name or "")
        if match:
            layers.setdefault(int(match.group(1)), []).append(node)
    return layers


def _interface(nodes: list[ir.Node], graph_outputs: set[ir.Value]) -> tuple[list[ir.Value], list[ir.Value]]:
    """The values a block reads from outside (in order of first use) and those read after it (in order made)."""
    members = set(nodes)
    inputs: dict[ir.Value, None] = {}
    outputs = []
    for node in nodes:
        for value in node.inputs:
            if value is not None and value.producer() not in members:
                inputs.setdefault(value)
        for value in node.outputs:
            if value in graph_outputs or any(user not in members for user, _ in value.uses()):
                outputs.append(value)
    return list(inputs), outputs


def _signature(nodes: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value]) -> tuple:
    """What makes two blocks the same function: ops, attributes and wiring, not names or weights."""
    where: dict[ir.Value, tuple] = {value: ("in", i) for i, value in enumerate(inputs)}
    parts = []
    for n, node in enumerate(nodes):
        for o, value in enumerate(node.outputs):
            where[value] = ("node", n, o)
        attributes = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
        parts.append((node.domain, node.op_type, attributes,
                      tuple(None if v is None else where[v] for v in node.inputs), len(node.outputs)))
    return tuple(parts), tuple(where[v] for v in outputs)


def outline_layer_groups(model: ir.Model, groups: Sequence[Sequence[int]] | None = None, *,
                         prefix: str = "/model/layers.") -> ir.Model:
    """``model`` with each group of identical blocks as one function, called per block (see the module docstring).

    ``groups``: lists of layer indices, each of identical blocks (a ValueError names the first that differs);
    None: every set of identical blocks. Changes and returns ``model``."""
    graph = model.graph
    layers = _layers(graph, prefix)
    graph_outputs = set(graph.outputs)
    interfaces = {i: _interface(nodes, graph_outputs) for i, nodes in layers.items()}
    signatures = {i: _signature(layers[i], *interfaces[i]) for i in layers}
    if groups is None:
        by_signature: dict[tuple, list[int]] = {}
        for i in sorted(layers):
            by_signature.setdefault(signatures[i], []).append(i)
        groups = list(by_signature.values())
    for group in groups:
        unknown = [i for i in group if i not in layers]
        if unknown:
            raise ValueError(f"subgraph_layer_groups: the model has no layer {unknown[0]}")
        for i in group[1:]:
            if signatures[i] != signatures[group[0]]:
                raise ValueError(f"subgraph_layer_groups: layer {i} is not identical to layer {group[0]} (its ops, "
                                 f"attributes or wiring differ: {_first_difference(layers[group[0]], layers[i])})")
    for number, group in enumerate(groups):
        _outline(model, f"block{number}", [(f"{prefix}{i}", layers[i]) for i in group])
    return model


def _first_difference(a: list[ir.Node], b: list[ir.Node]) -> str:
    for x, y in zip(a, b):
        if (x.op_type, x.domain) != (y.op_type, y.domain) or \
                {k: repr(v.value) for k, v in x.attributes.items()} != {k: repr(v.value) for k, v in y.attributes.items()}:
            return f"{x.name} ({x.op_type}) against {y.name} ({y.op_type})"
    return f"{len(a)} nodes against {len(b)}" if len(a) != len(b) else "the wiring"


def _outline(model: ir.Model, name: str, blocks: list[tuple[str, list[ir.Node]]]) -> None:
    """Replace each block's nodes by a call of function ``name``, whose body is the first block's nodes."""
    graph = model.graph
    body_nodes = blocks[0][1]
    body_inputs: list[ir.Value] = []
    body_outputs: list[ir.Value] = []
    for number, (scope, nodes) in enumerate(blocks):
        # the interface now: the blocks outlined before read and make the calls' values, not the old ones
        inputs, outputs = _interface(nodes, set(graph.outputs))
        if number == 0:
            body_inputs, body_outputs = inputs, outputs
        call_outputs = [ir.Value(name=None, type=v.type, shape=v.shape) for v in outputs]
        call = ir.Node(BLOCKS_DOMAIN, name, list(inputs), outputs=call_outputs, name=scope)
        graph.insert_before(nodes[0], call)
        members = set(nodes)
        for old, new in zip(outputs, call_outputs):
            for user, index in list(old.uses()):
                if user not in members:
                    user.replace_input_with(index, new)
            for position, value in enumerate(graph.outputs):
                if value is old:
                    graph.outputs[position] = new
            value_name = old.name
            old.name = None
            new.name = value_name
        graph.remove(nodes, safe=False)
    # The first block's nodes are the body: its outside values become the function's inputs.
    parameters = [ir.Value(name=f"arg{i}", type=v.type, shape=v.shape) for i, v in enumerate(body_inputs)]
    members = set(body_nodes)
    for value, parameter in zip(body_inputs, parameters):
        for user, index in list(value.uses()):
            if user in members:
                user.replace_input_with(index, parameter)
    for i, value in enumerate(body_outputs):
        value.name = f"out{i}"
    body = ir.Graph(parameters, list(body_outputs), nodes=body_nodes, opset_imports=dict(graph.opset_imports),
                    name=name)
    function = ir.Function(BLOCKS_DOMAIN, name, graph=body, attributes=[])
    model.functions[function.identifier()] = function
    graph.opset_imports[BLOCKS_DOMAIN] = 1
