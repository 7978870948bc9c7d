"""The static check of a graph against what TensorRT's ONNX parser takes (:mod:`.tensorrt_parser_table`, its
operator table and types as data).

No GPU and no TensorRT library here, so the ``tensorrt`` target's graph is checked against the parser's own
published support and, where the table says too little, the importer source of the same commit
(``onnxOpImporters.cpp``, ``ModelImporter.cpp``):

* Each node's op is in the table (ops marked unsupported, and ops past opset 20 such as ``RMSNormalization``,
  ``RotaryEmbedding`` and ``Attention``, have no importer). The "Supported Types" column constrains the op's data
  operand (:func:`typed_values`), not index or shape inputs.
* Types: INT8, INT4 and FP8 are *quantized types*: only as the input of ``DequantizeLinear`` (or the output of
  ``QuantizeLinear``). UINT8 is for network inputs and outputs (and ``Cast``). DOUBLE is refused here: TensorRT
  casts it down to FLOAT, clamping, which is not the graph's arithmetic.
* Opsets: the parser does not refuse a newer import (``ModelImporter::importModel`` only records it; importers branch
  on ``getOpsetVersion() >= N``), so what matters is whether each op's meaning changed after 20 for the importer
  that runs it (the table module's ``NEWER_OPSET_NOTES``).
* Some restrictions are checked, not only quoted (:data:`CHECKS`): ``axes`` that must be initializers,
  ``ScatterND`` without ``reduction``, ``DequantizeLinear``'s zero point, blocked scales and INT4 widths,
  ``LayerNormalization``'s single output.

Ops of other domains: the parser dispatches on the op type alone, ignoring the domain: a builtin importer of that
name first, then a model-local function, else ``FallbackPluginImporter``, which looks up a TensorRT plugin creator
whose **name is the op type**, at the node's ``plugin_version`` (string attribute, default "1") and
``plugin_namespace`` (default "") attributes. ember requires every non-standard node to state its plugin by
carrying ``plugin_version`` explicitly (so an onnxruntime contrib op such as ``com.microsoft.GroupQueryAttention``,
which has no TensorRT plugin, fails here, not in the parser), refuses one whose op type collides with a builtin
importer (it would silently become that ai.onnx op), and checks the body of a model-local function it calls.
Nested graphs (``If``/``Loop``/``Scan`` bodies) and initializers are checked like the main graph.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir

from ..passes.base import input_at
from .tensorrt_parser_table import (IO_ONLY_TYPES, OPERATORS, OPSET_RANGE, PARSER_SOURCE, QUANTIZED_TYPES,
                                   STANDARD_DOMAINS, TENSORRT_TYPES, TENSORRT_VERSION, UNSUPPORTED)

# --- the restrictions that are checked ----------------------------------------------------------------------------

Check = Callable[[ir.Node], "str | None"]


def is_constant(value: ir.Value | None) -> bool:
    """An initializer or a ``Constant``'s output: what the table calls "an initializer" / "a constant tensor"."""
    if value is None:
        return True
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def _constant_input(index: int, what: str) -> Check:
    def check(node: ir.Node) -> str | None:
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is not None and not is_constant(value):  # an absent optional input is left to its default
            return f"`{what}` (input {index}) must be an initializer, and {value.name!r} is computed"
        return None
    return check


def _no_reduction(node: ir.Node) -> str | None:
    attr = node.attributes.get("reduction")
    if attr is not None and attr.value != "none":
        return f"`reduction` is not supported (it is {attr.value!r})"
    return None


def _single_output(node: ir.Node) -> str | None:
    used = [v.name for v in node.outputs[1:] if v is not None and (v.uses() or v.is_graph_output())]
    return f"only the first output `Y` is supported, and {used} are used" if used else None


def _sorted_top_k(node: ir.Node) -> str | None:
    attr = node.attributes.get("sorted")
    return "`sorted` must be 1" if attr is not None and attr.value != 1 else None


def _dequantize(node: ir.Node) -> str | None:
    """The 10.1 importer's checks (``QuantDequantLinearHelper``) that a graph shows without running."""
    _, scale, *rest = node.inputs
    zero_point = rest[0] if rest else None
    if zero_point is not None:
        tensor = zero_point.const_value
        if tensor is None:
            return "`x_zero_point` must be zero: TensorRT quantizes symmetrically, and this one is computed"
        if np.any(tensor.numpy() != 0):
            return "`x_zero_point` must be zero: TensorRT quantizes symmetrically"
    if scale is None or scale.shape is None or not all(isinstance(d, int) for d in scale.shape):
        return "the scale must have a static shape"
    x = input_at(node, 0)
    if x.shape is None or not all(isinstance(d, int) for d in x.shape):
        return None
    x_dims, scale_dims = x.shape.numpy(), scale.shape.numpy()  # both static (checked above)
    if len(scale_dims) == len(x_dims) and len(x_dims) > 1 and int(np.prod(scale_dims)) != 1:
        blocked = [(i, d, s) for i, (d, s) in enumerate(zip(x_dims, scale_dims)) if d != s]
        if len(blocked) != 1 or any(d % s for _, d, s in blocked):
            return (f"blocked scales {list(scale_dims)} for {list(x_dims)}: TensorRT infers the block from the shapes "
                    "(it ignores block_size), so exactly one axis may be blocked and it must be a multiple of its "
                    "scale's length")
        axis, size, blocks = blocked[0]
        block_size = node.attributes.get("block_size")
        if block_size is not None and size // blocks != block_size.value:
            return (f"TensorRT infers the block from the shapes (ignoring block_size): axis {axis} of length {size} "
                    f"with {blocks} scales reads as blocks of {size // blocks}, not {block_size.value} (ONNX's short "
                    "last block)")
    if x.dtype == ir.DataType.INT4 and x_dims and x_dims[-1] % 2:
        return f"INT4 needs an even last dimension, and {x.name!r} is {list(x_dims)}"
    return None


_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare")
#: The restrictions checked per op (others are quoted in :data:`OPERATORS` only).
CHECKS: dict[str, tuple[Check, ...]] = {
    "Slice": (_constant_input(3, "axes"),), "Squeeze": (_constant_input(1, "axes"),),
    "Unsqueeze": (_constant_input(1, "axes"),), "Pad": (_constant_input(3, "axes"),),
    "CumSum": (_constant_input(1, "axis"),), "OneHot": (_constant_input(1, "depth"),),
    **{op: (_constant_input(1, "axes"),) for op in _REDUCE_OPS},
    "ScatterND": (_no_reduction,), "DequantizeLinear": (_dequantize,), "LayerNormalization": (_single_output,),
    "TopK": (_sorted_top_k,),
}


def typed_values(node: ir.Node) -> list[ir.Value]:
    """The operands whose type the table's "Supported Types" column constrains: the data input (``Where``'s
    ``X``), both sides of a ``Cast``, the output of the ops that make a tensor from attributes."""
    if node.op_type == "Where":
        values = [node.inputs[1]]
    elif node.op_type in ("Cast", "CastLike"):
        values = [node.inputs[0], node.outputs[0]]
    elif node.op_type in ("Constant", "ConstantOfShape", "RandomNormal", "RandomUniform") or not node.inputs:
        values = [node.outputs[0]]
    else:
        values = [node.inputs[0]]
    return [v for v in values if v is not None]  # an absent input has no type to check


# --- types of untyped values --------------------------------------------------------------------------------------

_CONCRETE = {f"tensor({name})": dtype for name, dtype in (
    ("float", ir.DataType.FLOAT), ("int64", ir.DataType.INT64), ("int32", ir.DataType.INT32),
    ("bool", ir.DataType.BOOL))}


class _Types:
    """Every value's element type: its own, else inferred node by node from ONNX's schemas (lowering passes leave
    their new values untyped; the type does not depend on shapes or data, so no weights are read)."""

    def __init__(self, opset: int):
        self.opset = opset
        self.inferred: dict[ir.Value, ir.DataType] = {}

    def of(self, value: ir.Value | None) -> ir.DataType | None:
        if value is None:
            return None
        return value.dtype if value.dtype is not None else self.inferred.get(value)

    def infer(self, node: ir.Node) -> None:
        if node.domain not in STANDARD_DOMAINS or all(self.of(v) is not None for v in node.outputs):
            return
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, "")
        except onnx.defs.SchemaError:
            return
        proto = onnx.NodeProto(op_type=node.op_type, input=[f"i{i}" if v is not None else ""
                                                            for i, v in enumerate(node.inputs)],
                               output=[f"o{i}" for i in range(len(node.outputs))])
        proto.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values()
                               if a.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS))
        types = {f"i{i}": onnx.helper.make_tensor_type_proto(int(t), None)
                 for i, v in enumerate(node.inputs) if (t := self.of(v)) is not None}
        try:
            out = onnx.shape_inference.infer_node_outputs(schema, proto, types,
                                                          opset_imports=[onnx.helper.make_opsetid("", self.opset)])
            found = {i: out[f"o{i}"].tensor_type.elem_type for i in range(len(node.outputs)) if f"o{i}" in out}
        except Exception:  # noqa: BLE001 - inference needs what the graph does not say; fall back to the schema
            found = {}
        for i, value in enumerate(node.outputs):
            if self.of(value) is None:
                dtype = ir.DataType(found[i]) if found.get(i) else self._by_schema(schema, node, i)
                if dtype is not None:
                    self.inferred[value] = dtype

    def _by_schema(self, schema: onnx.defs.OpSchema, node: ir.Node, index: int) -> ir.DataType | None:
        if index >= len(schema.outputs):
            return None
        type_str = schema.outputs[index].type_str
        if type_str in _CONCRETE:
            return _CONCRETE[type_str]
        for formal, value in zip(schema.inputs, node.inputs):
            if formal.type_str == type_str and self.of(value) is not None:
                return self.of(value)
        return None


# --- the check ----------------------------------------------------------------------------------------------------

def _label(node: ir.Node) -> str:
    op = f"{node.domain}.{node.op_type}" if node.domain not in STANDARD_DOMAINS else node.op_type
    return f"{op} node {node.name!r}"


def _type_problem(value: ir.Value, dtype: ir.DataType, node: ir.Node, is_input: bool, index: int) -> str | None:
    side = f"{'input' if is_input else 'output'} {index} ({value.name!r})"
    if dtype == ir.DataType.DOUBLE:
        return f"{side} is DOUBLE, which TensorRT casts down to FLOAT with clamping (not this graph's arithmetic)"
    if dtype not in TENSORRT_TYPES:
        return f"{side} is {dtype.name}, a type TensorRT has no tensors of"
    if dtype in QUANTIZED_TYPES:
        allowed = ((node.op_type == "DequantizeLinear" and is_input and index in (0, 2))
                   or (node.op_type == "QuantizeLinear" and (not is_input and index == 0 or is_input and index == 2)))
        if not allowed:
            return f"{side} is {dtype.name}, a quantized type TensorRT takes only through Quantize/DequantizeLinear"
    if dtype in IO_ONLY_TYPES and node.op_type not in ("Cast", "CastLike") and not (
            value.is_graph_input() or value.is_graph_output()):
        return f"{side} is {dtype.name}, which TensorRT takes only as a network input or output"
    return None


def _graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            subgraphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for subgraph in subgraphs:
                yield from _graphs(subgraph)


class _Checker:
    def __init__(self, model: ir.Model):
        self.model = model
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        self.opset = opset or OPSET_RANGE[1]
        self.types = _Types(self.opset)
        self.problems: list[str] = []  # the nodes', in graph order
        self.boundary: list[str] = []  # graph inputs and outputs, initializers
        self.functions_checked: set[ir.OperatorIdentifier] = set()

    def run(self) -> list[str]:
        if self.opset < OPSET_RANGE[0]:
            self.boundary.append(f"the graph imports ai.onnx opset {self.opset}; TensorRT {TENSORRT_VERSION}'s parser "
                                 f"takes {OPSET_RANGE[0]} and later")
        for value in self.model.graph.inputs:
            self._boundary("graph input", value)
        for graph in _graphs(self.model.graph):
            self._graph(graph)
        for value in self.model.graph.outputs:
            self._boundary("graph output", value)
        return self.problems + self.boundary

    def _boundary(self, what: str, value: ir.Value) -> None:
        dtype = self.types.of(value)
        if dtype is not None and (dtype not in TENSORRT_TYPES or dtype in QUANTIZED_TYPES):
            self.boundary.append(f"{what} {value.name!r}: type {dtype.name} is not a TensorRT network I/O type")

    def _graph(self, graph: ir.Graph | ir.Function) -> None:
        if isinstance(graph, ir.Graph):
            for name, value in graph.initializers.items():
                if value.dtype is not None and value.dtype not in TENSORRT_TYPES:
                    self.boundary.append(f"initializer {name!r}: type {value.dtype.name} is not a TensorRT type")
        for node in graph:
            self.types.infer(node)
            why = self._node(node)
            if why:
                self.problems.append(f"{_label(node)}: {why}")

    def _node(self, node: ir.Node) -> str | None:
        if node.domain not in STANDARD_DOMAINS:
            return self._custom(node)
        support = OPERATORS.get(node.op_type)
        if support is None:
            if node.op_type in UNSUPPORTED:
                return f"TensorRT {TENSORRT_VERSION}'s ONNX parser does not support {node.op_type}"
            return (f"{node.op_type} is not in TensorRT {TENSORRT_VERSION}'s ONNX parser table (ai.onnx opsets "
                    f"{OPSET_RANGE[0]}-{OPSET_RANGE[1]}; {PARSER_SOURCE})")
        for is_input, values in ((True, node.inputs), (False, node.outputs)):
            for index, value in enumerate(values):
                dtype = self.types.of(value)
                if value is None or dtype is None:  # an absent optional input, a value of unknown type
                    continue
                if why := _type_problem(value, dtype, node, is_input, index):
                    return why
        for value in typed_values(node):
            dtype = self.types.of(value)
            if dtype is not None and dtype not in support.types:
                names = ", ".join(sorted(t.name for t in support.types))
                return f"type {dtype.name} of {value.name!r} is not one TensorRT's {node.op_type} takes ({names})"
        for check in CHECKS.get(node.op_type, ()):
            if why := check(node):
                return why
        return None

    def _custom(self, node: ir.Node) -> str | None:
        if node.op_type in OPERATORS or node.op_type in UNSUPPORTED:
            return (f"TensorRT's parser ignores the domain and would import it as ai.onnx {node.op_type}; "
                    "name a plugin by an op type of its own")
        function = self.model.functions.get(node.op_identifier())
        if function is not None:
            if node.op_identifier() not in self.functions_checked:
                self.functions_checked.add(node.op_identifier())
                self._graph(function)
            return None
        version = node.attributes.get("plugin_version")
        if version is None or version.type != ir.AttributeType.STRING:
            return ("not an ONNX op, so TensorRT's parser imports it as the plugin named "
                    f"{node.op_type!r}, and the node names no plugin_version (a string attribute; plugin_namespace "
                    "optional): no TensorRT plugin is known to implement it")
        return None


def check_tensorrt_graph(model: ir.Model) -> list[str]:
    """Every reason TensorRT's ONNX parser (:data:`TENSORRT_VERSION`) would refuse ``model``, one line each: the nodes'
    in graph order (nested graphs after their graph, a model-local function's body where it is first called), then
    the opset, graph inputs, initializers and outputs. Empty when the table accepts it. Does not read weights (a lazily packed weight stays unpacked)."""
    return _Checker(model).run()


def require_tensorrt_graph(model: ir.Model) -> None:
    """ValueError, in one line naming the first refused op (its type, node name and why), unless
    :func:`check_tensorrt_graph` finds nothing."""
    problems = check_tensorrt_graph(model)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"TensorRT {TENSORRT_VERSION}'s ONNX parser cannot take this graph: {problems[0]}{more}")


__all__ = ["CHECKS", "check_tensorrt_graph", "is_constant", "require_tensorrt_graph", "typed_values"]
