"""Cut a rank's lowered graph at its collectives into stages, for a target with no collective inside its graphs.

onnxruntime's CPU provider has no ``AllReduce`` kernel, so a tensor-parallel rank graph (``graphs/nn/distributed/``)
runs as a sequence of stage graphs: the runtime runs stage ``k``, performs the collectives that follow it through
its communicator (``runtime/distributed/``), and feeds their results to the stages after (DESIGN.md: distribution).

A node goes to the last stage it can run in: no earlier than the collectives its inputs wait for, no later than its
first consumer. So work that depends on no collective (the rotary table's lookup, the last token's index) runs
where it is first needed rather than being computed in stage 0 and carried through every stage. A value made in
one stage and read in a later one is an output of the first and an input of the other, under its own name; a graph
input is an input of every stage that reads it; a weight belongs to the stage that reads it (a small constant read
by several stages is copied to each). The stage graphs together compute exactly the rank graph: the cut moves
nodes, it changes none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from ember.graphs.ir.custom.collectives import COLLECTIVE_OPS
from ember.graphs.ir.versions import EMBER_DOMAIN

from .base import input_at, name_of


@dataclass(frozen=True)
class Collective:
    """A collective the runtime performs between two stages: ``op`` over ``world_size`` ranks, reading the value
    named ``input`` (made by an earlier stage) and giving the value named ``output`` (read by later stages)."""

    op: str
    input: str
    output: str
    world_size: int
    axis: int | None = None

    def to_json(self) -> dict[str, Any]:
        entry = {"op": self.op, "input": self.input, "output": self.output, "world_size": self.world_size}
        if self.axis is not None:
            entry["axis"] = self.axis
        return entry

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> "Collective":
        return cls(entry["op"], entry["input"], entry["output"], int(entry["world_size"]), entry.get("axis"))


@dataclass
class Stage:
    """One stage graph and the collectives that run after it (none after the last)."""

    model: ir.Model
    collectives_after: list[Collective] = field(default_factory=list)


def is_collective(node: ir.Node) -> bool:
    return node.domain == EMBER_DOMAIN and node.op_type in COLLECTIVE_OPS


def has_collectives(model: ir.Model) -> bool:
    return any(is_collective(node) for node in model.graph)


def cut_at_collectives(model: ir.Model) -> list[Stage]:
    """The stages of ``model`` (see the module docstring); the model's graph is emptied (its nodes and weights now
    belong to the stages). A graph with no collective is one stage."""
    graph = model.graph
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for node in graph for attr in node.attributes.values()):
        raise ValueError("cannot cut a graph with control-flow subgraphs at its collectives")
    _outputs_not_from_collectives(graph)
    nodes = list(graph)
    stage_of, boundary_of, count = _place(graph, nodes)
    graph_outputs = set(graph.outputs)
    graph.outputs.clear()  # a value is the output of one graph at a time: they become the stages' outputs
    stages = [_stage_graph(graph, model, [n for n in nodes if stage_of.get(n) == s], s, stage_of, graph_outputs)
              for s in range(count)]
    result = [Stage(m) for m in stages]
    for node, boundary in boundary_of.items():
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else None
        result[boundary].collectives_after.append(Collective(
            node.op_type, name_of(input_at(node, 0)), name_of(node.outputs[0]),
            node.attributes["world_size"].as_int(), axis))
    for node in boundary_of:  # the stages took every other node
        graph.remove(node, safe=False)
    graph.initializers.clear()
    graph.inputs.clear()
    graph.outputs.clear()
    return result


def _outputs_not_from_collectives(graph: ir.Graph) -> None:
    """A graph output that a collective makes gets an Identity after it, so that every output is made by a stage
    (the runtime binds outputs to stages, and the collective's result to the stages that read it)."""
    for index, value in enumerate(list(graph.outputs)):
        producer = value.producer()
        if producer is None or not is_collective(producer):
            continue
        name = value.name
        value.name = f"{name}_collected"
        out = ir.Value(name=name, type=value.type, shape=value.shape)
        node = ir.Node("", "Identity", [value], outputs=[out], name=f"{producer.name}/output")
        graph.insert_after(producer, node)
        graph.outputs[index] = out


def _place(graph: ir.Graph, nodes: list[ir.Node]) -> tuple[dict[ir.Node, int], dict[ir.Node, int], int]:
    """Each node's stage, each collective's boundary (it runs after that stage), and the number of stages."""
    ready: dict[ir.Value, int] = {}  # the first stage a value can be read in (inputs and weights: any)
    earliest: dict[ir.Node, int] = {}
    boundary_of: dict[ir.Node, int] = {}
    for node in nodes:
        start = max([ready.get(v, 0) for v in node.inputs if v is not None], default=0)
        if is_collective(node):
            boundary_of[node] = start
            ready[node.outputs[0]] = start + 1
        else:
            earliest[node] = start
            for value in node.outputs:
                ready[value] = start
    count = max(boundary_of.values(), default=-1) + 2
    stage_of: dict[ir.Node, int] = {}
    for node in reversed(nodes):
        if node in boundary_of:
            continue
        needed = [stage_of[user] if user in stage_of else boundary_of[user]
                  for value in node.outputs for user, _ in value.uses() if user in stage_of or user in boundary_of]
        stage_of[node] = max(earliest[node], min(needed)) if needed else earliest[node]
    return stage_of, boundary_of, count


def _stage_graph(graph: ir.Graph, model: ir.Model, stage_nodes: list[ir.Node], stage: int,
                 stage_of: dict[ir.Node, int], graph_outputs: set[ir.Value]) -> ir.Model:
    """One stage's model: its nodes, with what they read from outside as inputs (weights as initializers)."""
    if not stage_nodes:
        raise ValueError(f"stage {stage} of the cut has no nodes (two collectives with nothing between them)")
    members = set(stage_nodes)
    inputs: dict[str, ir.Value] = {}
    initializers: dict[str, ir.Value] = {}
    for node in stage_nodes:
        for index, value in enumerate(node.inputs):
            if value is None or value.producer() in members:
                continue
            name = name_of(value)  # a stage's inputs and weights are bound by name
            if value.is_initializer() or value.const_value is not None:
                initializers.setdefault(name, _own_weight(value, stage_of, stage))
                replacement = initializers[name]
            else:
                if name not in inputs:
                    inputs[name] = ir.Value(name=name, type=value.type or ir.TensorType(element_type(value)),
                                            shape=value.shape)
                replacement = inputs[name]
            if replacement is not value:
                node.replace_input_with(index, replacement)
    outputs = []
    for node in stage_nodes:
        for value in node.outputs:
            read_later = any(user not in members for user, _ in value.uses())
            if value in graph_outputs or read_later:
                outputs.append(value)
    for node in stage_nodes:
        graph.remove(node, safe=False)
    for value in initializers.values():
        if value.graph is graph:
            graph.initializers.pop(name_of(value))
    stage_graph = ir.Graph(list(inputs.values()), outputs, nodes=stage_nodes, initializers=list(initializers.values()),
                           opset_imports=dict(graph.opset_imports), name=f"{graph.name}_stage{stage}")
    for key, text in graph.metadata_props.items():
        stage_graph.metadata_props[key] = text
    stage_graph.metadata_props["ember.stage"] = str(stage)
    return ir.Model(stage_graph, ir_version=model.ir_version, producer_name=model.producer_name)


def _own_weight(value: ir.Value, stage_of: dict[ir.Node, int], stage: int) -> ir.Value:
    """The weight itself for the first stage that reads it; a copy (same name, same tensor) for any other."""
    readers = sorted({stage_of[user] for user, _ in value.uses() if user in stage_of})
    if readers and readers[0] == stage and value.graph is not None:
        return value
    return ir.Value(name=value.name, type=value.type, shape=value.shape, const_value=value.const_value)


#: Ops whose output's element type is fixed, or taken from an input other than the first (lowering passes build
#: nodes without output types; a value that crosses stages becomes a graph input, which must have one).
_FIXED_TYPES = {"Shape": ir.DataType.INT64, "Size": ir.DataType.INT64, "ArgMax": ir.DataType.INT64,
                "ArgMin": ir.DataType.INT64, "NonZero": ir.DataType.INT64, "Equal": ir.DataType.BOOL,
                "Less": ir.DataType.BOOL, "LessOrEqual": ir.DataType.BOOL, "Greater": ir.DataType.BOOL,
                "GreaterOrEqual": ir.DataType.BOOL, "Not": ir.DataType.BOOL, "And": ir.DataType.BOOL,
                "Or": ir.DataType.BOOL, "IsNaN": ir.DataType.BOOL}
_TYPE_FROM_INPUT = {"Where": 1, "GatherBlockQuantized": 2, "DequantizeLinear": 1}


def element_type(value: ir.Value) -> ir.DataType:
    """``value``'s element type: its own, or what its producer's op makes of its inputs' (see ``_FIXED_TYPES``); a
    ValueError naming the value when neither says."""
    seen: set[ir.Value] = set()
    while value.dtype is None:
        producer = value.producer()
        if producer is None or value in seen:
            raise ValueError(f"the element type of {value.name} is unknown: cannot make it a stage's input")
        seen.add(value)
        op = producer.op_type
        if op == "Cast":
            return ir.DataType(producer.attributes["to"].as_int())
        if op == "Constant":
            return producer.attributes["value"].as_tensor().dtype
        if op in _FIXED_TYPES and producer.domain == "":
            return _FIXED_TYPES[op]
        index = _TYPE_FROM_INPUT.get(op, 0)
        candidates = [producer.inputs[index]] if index < len(producer.inputs) else []
        candidates += [v for v in producer.inputs if v is not None and v.dtype is not None]
        value = next((v for v in candidates if v is not None), None) or value
    return value.dtype
