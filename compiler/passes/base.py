"""What every compiler pass is: a function from an ``onnx_ir`` model to the same model, changed in place."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import onnx_ir as ir

Pass = Callable[[ir.Model], ir.Model]


def nodes_of(model: ir.Model, op_type: str, domain: str = "") -> Iterator[ir.Node]:
    """The main graph's nodes of one op type (a snapshot, so passes may edit while iterating)."""
    return iter([n for n in model.graph if n.op_type == op_type and n.domain == domain])


def replace_node(model: ir.Model, old: ir.Node, new_nodes: list[ir.Node], new_outputs: list[ir.Value]) -> None:
    """Put ``new_nodes`` where ``old`` was; ``new_outputs`` take over its outputs (names and graph outputs too)."""
    for old_value, new_value in zip(old.outputs, new_outputs):
        new_value.name = old_value.name
        new_value.shape = old_value.shape
        new_value.type = old_value.type
    for value in old.outputs:
        value.name = None
    ir.convenience.replace_nodes_and_values(model.graph, old, [old], new_nodes, list(old.outputs), new_outputs)
