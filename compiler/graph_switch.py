"""One model holding two lowered graphs of the same weights, one of them run per call, chosen by a boolean input.

Why: decode slots (``runtime/pipelines/decode_slots.py``) run a lone sequence's steps on the continuous graph and
every other step on the paged one. As two onnxruntime sessions, the weights are loaded and prepacked twice (RSS
251 against 133 MiB for SmolLM2 q4_0); as one model that holds both graphs side by side, every call also runs the
idle graph on empty tensors (+0.4 ms per step, BENCHMARKS.md "Decode slots"). Here both graphs are the branches of
one ``If`` node: onnxruntime runs only the branch taken, and an initializer both branches read from the outer
graph is loaded and prepacked once. The branches' outputs are the ``If``'s, so a buffer bound to an output is
written in place whichever branch runs (checked bit for bit against the two models alone in
``tests/compiler/test_graph_switch.py``).

The two graphs share names where they share a buffer: ``renames`` maps an alternative graph's input or output name
to the default graph's name for the same role (a continuous graph's ``past_key_values.0.key`` is the paged graph's
``key_cache.0``). An outer input whose two graphs disagree on its shape is declared without one.
"""
from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

from .passes.base import name_of

#: Prefix of the alternative graph's own value names (node outputs, and initializers the default graph does not
#: hold the same), so that nothing it computes shadows a name of the outer graph.
ALTERNATIVE_PREFIX = "alternative/"
#: Prefix of the default graph's outputs inside its branch (the outer graph's ``If`` outputs keep the names).
DEFAULT_PREFIX = "default/"


def switch_graphs(default: ir.Model, alternative: ir.Model, switch: str,
                  renames: Mapping[str, str] | None = None) -> ir.Model:
    """One model that runs ``default``'s graph, or ``alternative``'s when the boolean scalar input ``switch`` is
    true (see the module docstring). Both models are taken apart: use only the result."""
    renames = dict(renames or {})
    _check_names(default, alternative, switch, renames)
    outer_inputs = _outer_inputs(default.graph, alternative.graph, renames)
    output_names = [name_of(v) for v in default.graph.outputs]
    by_name = {renames.get(name_of(v), name_of(v)): v for v in alternative.graph.outputs}
    alternative.graph.outputs[:] = [by_name[name] for name in output_names]  # the If's order
    initializers = _shared_initializers(default.graph, alternative.graph)
    for graph in (default.graph, alternative.graph):
        for value in list(graph.inputs):
            value.replace_all_uses_with(outer_inputs[renames.get(name_of(value), name_of(value))])
        graph.inputs.clear()
    default_branch = _branch(default.graph, DEFAULT_PREFIX, rename_all=False)
    alternative_branch = _branch(alternative.graph, ALTERNATIVE_PREFIX, rename_all=True)
    switch_value = ir.Value(name=switch, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    node = ir.Node("", "If", [switch_value], attributes=[ir.AttrGraph("then_branch", alternative_branch),
                                                          ir.AttrGraph("else_branch", default_branch)],
                   num_outputs=len(output_names), name="switch_graphs")
    for value, name, first, second in zip(node.outputs, output_names, default_branch.outputs,
                                          alternative_branch.outputs):
        value.name, value.dtype = name, first.dtype  # type: ignore[assignment]
        value.shape = first.shape if _same_shape(first.shape, second.shape) else None
    graph = ir.Graph([switch_value, *outer_inputs.values()], list(node.outputs), nodes=[node],
                     opset_imports=dict(default.graph.opset_imports), name=default.graph.name)
    for value in initializers:
        graph.register_initializer(value)
    return ir.Model(graph, ir_version=default.ir_version, producer_name=default.producer_name,
                    producer_version=default.producer_version)


def _check_names(default: ir.Model, alternative: ir.Model, switch: str, renames: dict[str, str]) -> None:
    """The two graphs' outputs correspond one to one (after ``renames``) with the same element types; neither has
    local functions (compiled graphs are inlined) and no default name takes the alternative's prefix (inputs are
    checked by :func:`_outer_inputs`)."""
    if default.functions or alternative.functions:
        raise ValueError("switch_graphs takes inlined graphs (no local functions)")
    names = [name_of(v) for v in default.graph.inputs] + list(default.graph.initializers)
    if switch in names or any(name.startswith(ALTERNATIVE_PREFIX) for name in names):
        raise ValueError(f"the default graph already has {switch!r} or names under {ALTERNATIVE_PREFIX!r}")
    mine = {name_of(v): v.dtype for v in default.graph.outputs}
    theirs = {renames.get(name_of(v), name_of(v)): v.dtype for v in alternative.graph.outputs}
    if mine != theirs:
        raise ValueError(f"the graphs' outputs do not correspond: {sorted(mine)} against {sorted(theirs)} "
                         f"(after renaming), or their types differ")


def _outer_inputs(default: ir.Graph, alternative: ir.Graph, renames: dict[str, str]) -> dict[str, ir.Value]:
    """One outer input per name either graph reads (the default's first), shaped where both agree; a name the two
    read with different element types is refused."""
    outer: dict[str, ir.Value] = {}
    for value in default.inputs:
        outer[name_of(value)] = ir.Value(name=value.name, type=value.type, shape=value.shape)
    for value in alternative.inputs:
        name = renames.get(name_of(value), name_of(value))
        if name not in outer:
            outer[name] = ir.Value(name=name, type=value.type, shape=value.shape)
        elif outer[name].dtype != value.dtype:
            raise ValueError(f"input {name!r} is {outer[name].dtype} in one graph and {value.dtype} in the other")
        elif not _same_shape(outer[name].shape, value.shape):
            outer[name].shape = None
    return outer


def _shared_initializers(default: ir.Graph, alternative: ir.Graph) -> list[ir.Value]:
    """Every initializer, taken out of its graph for the outer one: an alternative's initializer equal to the
    default's of the same name is replaced by it (held once); one that differs takes the alternative's prefix."""
    kept = dict(default.initializers)
    default.initializers.clear()
    for value in list(alternative.initializers.values()):
        name = name_of(value)
        alternative.initializers.pop(name)
        twin = kept.get(name)
        if twin is not None and _equal_tensors(twin, value):
            value.replace_all_uses_with(twin)
            continue
        value.name = ALTERNATIVE_PREFIX + name
        kept[value.name] = value
    return list(kept.values())


def _equal_tensors(first: ir.Value, second: ir.Value) -> bool:
    a, b = first.const_value, second.const_value
    if a is None or b is None or a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return a.tobytes() == b.tobytes()


def _branch(graph: ir.Graph, prefix: str, rename_all: bool) -> ir.Graph:
    """``graph``'s nodes as a subgraph of no inputs (it reads the outer graph's), its outputs in order; with
    ``rename_all`` every value it computes takes ``prefix``, else only its outputs (which the ``If`` renames)."""
    nodes = list(graph)
    outputs = list(graph.outputs)
    if any(value.producer() is None for value in outputs):
        raise ValueError(f"graph {graph.name!r} returns an input or initializer as it is; switch_graphs takes "
                         "graphs whose outputs are computed")
    graph.outputs.clear()
    graph.remove(nodes, safe=False)
    renamed = [out for node in nodes for out in node.outputs] if rename_all else outputs
    for value in renamed:
        if value.name:
            value.name = prefix + value.name
    return ir.Graph((), outputs, nodes=nodes, opset_imports=dict(graph.opset_imports), name=prefix.rstrip("/"))


def _same_shape(first: ir.Shape | None, second: ir.Shape | None) -> bool:
    return first is not None and second is not None and list(first) == list(second)
