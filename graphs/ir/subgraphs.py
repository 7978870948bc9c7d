"""Identical transformer blocks emitted once, as ONNX model-local functions (MAX's ``use_subgraphs``).

A decoder of 30 blocks holds 30 copies of the same nodes with different weights. :func:`outline_layer_groups` turns
each group of structurally identical blocks into one function in domain :data:`BLOCKS_DOMAIN` and each block into a
call of it: the block's weights and every other value it reads from outside are the call's inputs, the values read
after it (the hidden state, the present K/V) its outputs. Blocks are found by their nodes' scope
(``/model/layers.{i}/...``, :meth:`ember.graphs.ir.graph.Graph.scope`).

"Identical" means the same ops, attributes, wiring, value types and names relative to the block's scope. The names
count because the compiler inlines the functions again before it lowers (``compiler/passes/inline_functions.py``:
quantization and the attention lowerings look at MatMuls and their weights in the main graph, and the manifest
records lowerings per node name): the body keeps the first block's names, the function records that block's scope
(:data:`SCOPE_KEY`), and :func:`rescope` gives each call's nodes back their own names, so outline-then-inline is the
graph that was built. BENCHMARKS.md ("use_subgraphs") has what it saves.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import onnx_ir as ir

logger = logging.getLogger(__name__)

#: The domain of the block functions.
BLOCKS_DOMAIN = "ember.blocks"
BLOCKS_OPSET = 1
#: A block function's ``metadata_props`` key: the scope of the block whose names its body keeps.
SCOPE_KEY = "ember.block_scope"

_SUBGRAPH_ATTRIBUTES = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def rescope(name: str | None, body_scope: str, call_scope: str) -> str | None:
    """A body node's or value's name as block ``call_scope`` had it: names under ``body_scope`` move under
    ``call_scope``; other names are the same in every block of the group."""
    if name is not None and name.startswith(body_scope + "/"):
        return call_scope + name[len(body_scope):]
    return name


@dataclass(frozen=True)
class _Block:
    """One layer's nodes (in graph order) and its interface in the graph as it is now."""

    layer: int
    scope: str
    nodes: list[ir.Node]
    inputs: list[ir.Value]  # read from outside, in order of first use
    outputs: list[ir.Value]  # read after the block or graph outputs, in order made

    def local(self, name: str | None) -> tuple[str, str | None]:
        """``name`` made independent of the layer: what must match across a group."""
        if name is not None and name.startswith(self.scope + "/"):
            return "scope", name[len(self.scope):]
        return "as is", name

    def places(self) -> dict[ir.Value, tuple]:
        """Where each value the block reads comes from: its input k, or output o of its node n."""
        where: dict[ir.Value, tuple] = {value: ("input", k) for k, value in enumerate(self.inputs)}
        for n, node in enumerate(self.nodes):
            for o, value in enumerate(node.outputs):
                where[value] = ("node", n, o)
        return where

    def parts(self, n: int, where: dict[ir.Value, tuple]) -> dict[str, Hashable]:
        """Node ``n``'s share of the block's signature, by what a difference is reported as."""
        node = self.nodes[n]
        leaving = set(self.outputs)  # named by the call's outputs, not by the body
        return {
            "op": (node.domain, node.op_type, node.overload, node.version),
            "name": self.local(node.name),
            "attributes": tuple(sorted(_attribute_key(a) for a in node.attributes.values())),
            "inputs": tuple(None if v is None else where[v] for v in node.inputs),
            "outputs": tuple((_type_key(v), None if v in leaving else self.local(v.name)) for v in node.outputs),
            "metadata": (node.doc_string, tuple(sorted(node.metadata_props.items()))),
        }

    def signature(self) -> Hashable:
        """What makes two blocks calls of the same function (weights and the values they read do not)."""
        where = self.places()
        return (tuple(tuple(self.parts(n, where).values()) for n in range(len(self.nodes))),
                tuple(_type_key(v) for v in self.inputs), tuple(where[v] for v in self.outputs))


def _type_key(value: ir.Value) -> Hashable:
    shape = None if value.shape is None else tuple(d if isinstance(d, int) else str(d) for d in value.shape)
    return str(value.type), shape


def _attribute_key(attr: ir.Attr) -> tuple[str, str, Hashable]:
    value = attr.value
    if attr.type == ir.AttributeType.TENSOR:
        value = _tensor_key(value)
    elif attr.type == ir.AttributeType.TENSORS:
        value = tuple(_tensor_key(t) for t in value)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        value = tuple(value)
    return attr.name, attr.type.name, value


def _tensor_key(tensor: ir.TensorProtocol) -> Hashable:
    return str(tensor.dtype), tuple(tensor.shape), tensor.tobytes()


def _blocks(graph: ir.Graph, prefix: str) -> dict[int, _Block]:
    """Every layer's block, with its interface in ``graph`` as it is now."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)/")
    nodes: dict[int, list[ir.Node]] = {}
    for node in graph:
        match = pattern.match(node.name or "")
        if match:
            nodes.setdefault(int(match.group(1)), []).append(node)
    return {layer: _block(graph, layer, f"{prefix}{layer}", members) for layer, members in nodes.items()}


def _block(graph: ir.Graph, layer: int, scope: str, nodes: list[ir.Node]) -> _Block:
    members = set(nodes)
    inputs: dict[ir.Value, None] = {}
    outputs = []
    for node in nodes:
        for value in node.inputs:
            if value is not None and value.producer() not in members:
                inputs.setdefault(value)
        for value in node.outputs:
            if value.is_graph_output() or any(user not in members for user, _ in value.uses()):
                outputs.append(value)
    return _Block(layer, scope, nodes, list(inputs), outputs)


def _difference(first: _Block, other: _Block) -> str:
    """How ``other`` differs from ``first``, for the error that refuses to group them."""
    mine_at, theirs_at = first.places(), other.places()
    for n in range(min(len(first.nodes), len(other.nodes))):
        mine, theirs = first.parts(n, mine_at), other.parts(n, theirs_at)
        for part, value in theirs.items():
            if value != mine[part]:
                return _describe(part, first, other, n)
    if len(first.nodes) != len(other.nodes):
        return f"it has {len(other.nodes)} nodes, layer {first.layer} {len(first.nodes)}"
    for k, (a, b) in enumerate(zip(first.inputs, other.inputs)):
        if _type_key(a) != _type_key(b):
            return (f"its input {k} ({b.name}) is {_type_key(b)}, layer {first.layer}'s ({a.name}) "
                    f"{_type_key(a)}")
    return "different values of it are read after it"


def _describe(part: str, first: _Block, other: _Block, n: int) -> str:
    a, b = first.nodes[n], other.nodes[n]
    where = f"its node {b.name} ({b.op_type}) against layer {first.layer}'s {a.name} ({a.op_type})"
    if part == "attributes":
        for name in sorted(set(a.attributes) | set(b.attributes)):
            mine, theirs = a.attributes.get(name), b.attributes.get(name)
            if (mine and _attribute_key(mine)) != (theirs and _attribute_key(theirs)):
                return (f"{where}: attribute {name} is {theirs.value if theirs else 'absent'} against "
                        f"{mine.value if mine else 'absent'}")
    described = {"op": "a different op", "name": "a different name", "inputs": "reads different inputs",
                 "outputs": "outputs of other types or names", "metadata": "other doc_string or metadata_props"}
    return f"{where}: {described.get(part, part)}"


def _refusal(graph: ir.Graph, block: _Block) -> str | None:
    """Why ``block`` cannot become a call, or None: a subgraph (it could read values of the main graph that are
    not the node's inputs), or a node outside the block that both reads from it and feeds it."""
    for node in block.nodes:
        if any(a.type in _SUBGRAPH_ATTRIBUTES for a in node.attributes.values()):
            return f"its node {node.name} ({node.op_type}) holds a subgraph"
    members = set(block.nodes)
    for node in _after_block(graph, block):
        fed = [user for value in node.outputs for user, _ in value.uses() if user in members]
        if fed:
            return (f"{node.name} ({node.op_type}), outside it, reads the block's values and feeds its node "
                    f"{fed[0].name}")
    return None


def _after_block(graph: ir.Graph, block: _Block) -> list[ir.Node]:
    """The nodes that sit among the block's nodes but depend on them: they must run after its call."""
    members = set(block.nodes)
    inside = False
    remaining = len(block.nodes)
    after: set[ir.Node] = set()
    found = []
    for node in graph:
        if remaining == 0:
            break
        if node in members:
            inside, remaining = True, remaining - 1
        elif inside and any(v is not None and (v.producer() in members or v.producer() in after)
                            for v in node.inputs):
            after.add(node)
            found.append(node)
    return found


def outline_layer_groups(model: ir.Model, groups: Sequence[Sequence[int]] | None = None, *,
                         prefix: str = "/model/layers.") -> ir.Model:
    """``model`` with each group of identical blocks as one function, called once per block (module docstring).

    ``groups``: lists of layer indices, each of identical blocks (a ValueError names the first layer that differs
    from its group's first and what differs); layers in no group stay as they are. None: every set of identical
    blocks is a group (a block that can be no call, logged, stays as it is). Functions are ``block0``,
    ``block1``, ... in order of their groups. Changes and returns ``model``."""
    graph = model.graph
    blocks = _blocks(graph, prefix)
    if groups is None:
        by_signature: dict[Hashable, list[int]] = {}
        for layer in sorted(blocks):
            reason = _refusal(graph, blocks[layer])
            if reason:
                logger.info("layer %d stays in the main graph: %s", layer, reason)
                continue
            by_signature.setdefault(blocks[layer].signature(), []).append(layer)
        groups = list(by_signature.values())
    else:
        chosen = [list(group) for group in groups]
        _check_groups(graph, blocks, chosen)
        groups = chosen
    for number, group in enumerate(groups):
        # each outlining changes the interface of the blocks next to it (they now read a call's outputs)
        _outline(model, f"block{number}", [blocks[i] for i in group])
    logger.debug("outlined %d layers into %d functions", sum(map(len, groups)), len(groups))
    return model


def _check_groups(graph: ir.Graph, blocks: dict[int, _Block], groups: list[list[int]]) -> None:
    seen: set[int] = set()
    for group in groups:
        if not group:
            raise ValueError("subgraph_layer_groups: a group is empty")
        for layer in group:
            if layer not in blocks:
                raise ValueError(f"subgraph_layer_groups: the model has no layer {layer} (it has "
                                 f"{min(blocks, default=0)}..{max(blocks, default=-1)})")
            if layer in seen:
                raise ValueError(f"subgraph_layer_groups: layer {layer} is in two groups")
            seen.add(layer)
            reason = _refusal(graph, blocks[layer])
            if reason:
                raise ValueError(f"subgraph_layer_groups: layer {layer} cannot be a function call: {reason}")
        first = blocks[group[0]]
        signature = first.signature()
        for layer in group[1:]:
            if blocks[layer].signature() != signature:
                raise ValueError(f"subgraph_layer_groups: layer {layer} is not identical to layer {group[0]}: "
                                 f"{_difference(first, blocks[layer])}")


def _outline(model: ir.Model, name: str, group: list[_Block]) -> None:
    """Replace each block's nodes by a call of function ``name``, whose body is the first block's nodes."""
    graph = model.graph
    names = _parameter_names([_block(graph, b.layer, b.scope, b.nodes) for b in group])
    blocks = []
    for layer in group:
        # its interface now: the calls made before it changed what it reads (under the same names)
        block = _block(graph, layer.layer, layer.scope, layer.nodes)
        blocks.append(block)
        call_outputs = [ir.Value(name=v.name, type=v.type, shape=v.shape) for v in block.outputs]
        call = ir.Node(BLOCKS_DOMAIN, name, list(block.inputs), outputs=call_outputs, name=block.scope,
                       version=BLOCKS_OPSET)
        later = _after_block(graph, block)
        graph.insert_after(block.nodes[-1], call)
        if later:  # a node among the block's that reads it runs after the call (nothing it feeds is before)
            graph.remove(later)
            graph.insert_after(call, later)
        members = set(block.nodes)
        for old, new in zip(block.outputs, call_outputs):
            old.name = None
            for user, index in list(old.uses()):
                if user not in members:
                    user.replace_input_with(index, new)
            for position, value in enumerate(graph.outputs):
                if value is old:
                    graph.outputs[position] = new
        # the first block's nodes become the body, still reading the values it reads; the others are dropped,
        # no longer users of the weights they read (passes count a weight's users)
        graph.remove(block.nodes, safe=block is not blocks[0])
    model.functions[(BLOCKS_DOMAIN, name, "")] = _function(graph, name, blocks[0], names)
    graph.opset_imports[BLOCKS_DOMAIN] = BLOCKS_OPSET


def _function(graph: ir.Graph, name: str, body: _Block, names: list[str]) -> ir.Function:
    """The function whose body is ``body``'s (removed) nodes, its outside values turned into parameters ``names``."""
    parameters = [ir.Value(name=name, type=v.type, shape=v.shape) for name, v in zip(names, body.inputs)]
    members = set(body.nodes)
    for value, parameter in zip(body.inputs, parameters):
        for user, index in list(value.uses()):
            if user in members:
                user.replace_input_with(index, parameter)
    for k, value in enumerate(body.outputs):
        if body.local(value.name)[0] != "scope":  # a graph output's name (present.0.key) is not the block's
            value.name = f"output_{k}"
    function = ir.Function(BLOCKS_DOMAIN, name, graph=ir.Graph(
        parameters, list(body.outputs), nodes=body.nodes, name=name,
        opset_imports={d: v for d, v in graph.opset_imports.items() if d != BLOCKS_DOMAIN}), attributes=[])
    function.metadata_props[SCOPE_KEY] = body.scope
    return function


def _parameter_names(blocks: list[_Block]) -> list[str]:
    """The function's parameter names: the name every block gives its input with its layer taken out
    (``self_attn.q_proj.weight``, ``cache_lengths``), else ``input_{k}``."""
    common = [_common_name(blocks, k) for k in range(len(blocks[0].inputs))]
    taken = {name for name in common if name is not None and common.count(name) == 1}
    names = []
    for k, name in enumerate(common):
        if name is None or common.count(name) > 1:
            name = f"input_{k}"
            while name in taken:
                name += "_"
        names.append(name)
    return names


def _common_name(blocks: list[_Block], k: int) -> str | None:
    names = set()
    for block in blocks:
        name = block.inputs[k].name or ""
        weights = block.scope.strip("/").replace("/", ".") + "."
        names.add(name[len(block.scope):] if name.startswith(block.scope + "/")
                  else name[len(weights):] if name.startswith(weights) else name)
    return names.pop() if len(names) == 1 and "" not in names else None
