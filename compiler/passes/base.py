"""What every compiler pass is: a function from an ``onnx_ir`` model to the same model, changed in place."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import onnx_ir as ir

Pass = Callable[[ir.Model], ir.Model]


def nodes_of(model: ir.Model, op_type: str, domain: str = "") -> Iterator[ir.Node]:
    """The main graph's nodes of one op type (a snapshot, so passes may edit while iterating)."""
    return iter([n for n in model.graph if n.op_type == op_type and n.domain == domain])


def input_at(node: ir.Node, index: int) -> ir.Value:
    """Input ``index`` of ``node``; a ValueError naming the node when it is absent (an optional input left out, or
    fewer inputs than the op's schema has): what a pass reads, it needs."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        raise ValueError(f"{node.name or node.op_type}: input {index} is missing")
    return value


def static_dim(value: ir.Value, axis: int) -> int:
    """Dimension ``axis`` of ``value``'s shape as an int; a ValueError naming the value when the shape is unknown or
    the dimension symbolic (a pass that needs a size at compile time says so instead of failing in arithmetic)."""
    shape = value.shape
    dim = shape[axis] if shape is not None else None
    if not isinstance(dim, int):
        raise ValueError(f"{value.name}: dimension {axis} must be static, got shape {shape}")
    return dim


def name_of(value: ir.Value) -> str:
    """``value``'s name; a ValueError when it has none (a pass that keys on names needs every value named)."""
    if value.name is None:
        raise ValueError(f"a value produced by {value.producer()} has no name")
    return value.name


def replace_node(model: ir.Model, old: ir.Node, new_nodes: list[ir.Node], new_outputs: list[ir.Value]) -> None:
    """Put ``new_nodes`` where ``old`` was; ``new_outputs`` take over its outputs (names and graph outputs too)."""
    for old_value, new_value in zip(old.outputs, new_outputs):
        new_value.name = old_value.name
        new_value.shape = old_value.shape
        new_value.type = old_value.type
    for value in old.outputs:
        value.name = None
    ir.convenience.replace_nodes_and_values(model.graph, old, [old], new_nodes, list(old.outputs), new_outputs)
