"""What TensorRT's ONNX parser takes, as data, and the static check of a graph against it.

No GPU and no TensorRT library here, so the ``tensorrt`` target's graph is checked against the parser's own
published support: ``docs/operators.md`` of ``onnx/onnx-tensorrt`` at the newest 10.x release in the snapshot this
was written from (tag ``release/10.1-GA``, commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c), and the importer source
of that commit (``onnxOpImporters.cpp``, ``ModelImporter.cpp``) where the table says too little. TensorRT's later
10.x parsers add operators; a graph this table accepts is therefore taken by them too, not the other way round.

* :data:`OPERATORS`: ai.onnx op type -> the tensor types its importer takes and the table's restrictions (text,
  verbatim). The "Supported Types" column constrains the op's data operand (:func:`typed_values`), not index or
  shape inputs. Ops marked unsupported are :data:`UNSUPPORTED`; ops past opset 20 (``RMSNormalization``,
  ``RotaryEmbedding``, ``Attention``) are in neither: the parser has no importer for them.
* Types (the table's header): TensorRT takes FLOAT, FLOAT16, BFLOAT16, INT32, INT64, FLOAT8E4M3FN, INT8, INT4,
  UINT8 and BOOL. INT8, INT4 and FP8 are *quantized types*: only as the input of ``DequantizeLinear`` (or the
  output of ``QuantizeLinear``). UINT8 is for network inputs and outputs (and ``Cast``). DOUBLE is refused here:
  TensorRT casts it down to FLOAT, clamping, which is not the graph's arithmetic.
* Opsets: the table covers ai.onnx 9-20. The parser does not refuse a newer import (``ModelImporter::importModel``
  only records it; importers branch on ``getOpsetVersion() >= N``), so what matters is whether each op's meaning
  changed after 20 for the importer that runs it; :data:`NEWER_OPSET_NOTES` lists the ones ember emits.
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
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from ..passes.base import input_at

TENSORRT_VERSION = "10.1.0"
#: Where :data:`OPERATORS` is from (``git show 96e7811:docs/operators.md`` in github.com/onnx/onnx-tensorrt).
PARSER_SOURCE = "onnx/onnx-tensorrt@96e781103cfc4adf4a6bb557e94bac8e693f6f4c (release/10.1-GA):docs/operators.md"
#: The ai.onnx opsets the table covers.
OPSET_RANGE = (9, 20)
#: Ops ember emits whose ONNX definition changed after opset 20, and how the 10.1 parser reads them.
NEWER_OPSET_NOTES = {
    "DequantizeLinear": "opset 21 adds block_size and INT4; the parser ignores block_size and infers the block from "
                        "the input's and scale's shapes, so every dimension must be a multiple of its scale's "
                        "(checked)",
}
#: The ONNX types TensorRT's tensors can have (the table's names).
TYPES = {"FP32": ir.DataType.FLOAT, "FP16": ir.DataType.FLOAT16, "BF16": ir.DataType.BFLOAT16,
         "INT32": ir.DataType.INT32, "INT64": ir.DataType.INT64, "FP8": ir.DataType.FLOAT8E4M3FN,
         "INT8": ir.DataType.INT8, "INT4": ir.DataType.INT4, "UINT8": ir.DataType.UINT8, "BOOL": ir.DataType.BOOL}
TENSORRT_TYPES = frozenset(TYPES.values())
QUANTIZED_TYPES = frozenset({ir.DataType.INT8, ir.DataType.INT4, ir.DataType.FLOAT8E4M3FN})
IO_ONLY_TYPES = frozenset({ir.DataType.UINT8})
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OpSupport:
    """One row of the table: the types of the op's data operand, and its restrictions as the table words them."""

    types: frozenset[ir.DataType]
    restrictions: str = ""


F = ("FP32", "FP16", "BF16")
FI = F + ("INT32", "INT64")
FIB = FI + ("BOOL",)
B = ("BOOL",)

# The table's "Y" rows, in its order (its one typo, ConstantOfShape's "INF64", read as INT64).
_TABLE: dict[str, tuple] = {
    'Abs': (FI,),
    'Acos': (F,),
    'Acosh': (F,),
    'Add': (FI,),
    'And': (B,),
    'ArgMax': (FI,),
    'ArgMin': (FI,),
    'Asin': (F,),
    'Asinh': (F,),
    'Atan': (F,),
    'Atanh': (F,),
    'AveragePool': (F, '2D or 3D Pooling only. `dilations` must be empty or all ones'),
    'BatchNormalization': (F,),
    'Cast': (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'UINT8', 'BOOL'),),
    'CastLike': (('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'UINT8', 'BOOL'),),
    'Ceil': (F,),
    'Celu': (F,),
    'Clip': (F,),
    'Concat': (FIB,),
    'Constant': (FIB, '`sparse_value`, `value_string`, and `value_strings` attributes are unsupported.'),
    'ConstantOfShape': (FIB,),
    'Conv': (F,),
    'ConvTranspose': (F,),
    'Cos': (F,),
    'Cosh': (F,),
    'CumSum': (F, '`axis` must be an initializer'),
    'DeformConv': (('FP32', 'FP16'), ('`input` must have 1D or 2D spatial dimensions. `pads` for the beginning and end along each spatial '
                                      'axis must be the same')),
    'DepthToSpace': (FI,),
    'DequantizeLinear': (('INT8', 'FP8', 'INT4'), '`x_zero_point` must be zero'),
    'Div': (FI,),
    'Dropout': (F, '`is_traning` must be an initializer and evaluate to False.'),
    'Einsum': (F,),
    'Elu': (F,),
    'Equal': (FI,),
    'Erf': (F,),
    'Exp': (F,),
    'Expand': (FIB,),
    'EyeLike': (FIB, '`input` must have static dimensions'),
    'Flatten': (FIB,),
    'Floor': (F,),
    'Gather': (FIB,),
    'GatherElements': (FIB,),
    'GatherND': (FIB,),
    'Gelu': (('FP32', 'FP16', 'BF16', 'INT8', 'INT32', 'INT64'),),
    'Gemm': (F,),
    'GlobalAveragePool': (F,),
    'GlobalLpPool': (F,),
    'GlobalMaxPool': (F,),
    'Greater': (FI,),
    'GreaterOrEqual': (FI,),
    'GridSample': (('FP32', 'FP16'), 'Input must be 4D input.'),
    'GroupNormalization': (F,),
    'GRU': (F, 'For bidirectional GRUs, activation functions must be the same for both the forward and reverse pass'),
    'HardSigmoid': (F,),
    'HardSwish': (F,),
    'Hardmax': (F, '`axis` dimension of input must be a build-time constant'),
    'Identity': (FIB,),
    'If': (FIB, ('Output tensors of the two conditional branches must have the same rank and must have different names')),
    'ImageScaler': (F,),
    'InstanceNormalization': (F,),
    'IsInf': (F,),
    'IsNaN': (FI,),
    'LayerNormalization': (F, 'Only the first output `Y` is supported.'),
    'LeakyRelu': (F,),
    'Less': (FI,),
    'LessOrEqual': (FI,),
    'Log': (F,),
    'LogSoftmax': (F,),
    'Loop': (FIB, ('Scan output length cannot be dynamic. The shape of Loop carried dependencies must be the same across'
                   ' all loop iterations.')),
    'LRN': (F,),
    'LSTM': (F, ('For bidirectional LSTMs, activation functions must be the same for both the forward and reverse '
                 'pass. `input_forget` attribute must be 0. `layout` attribute must be 0.')),
    'LpNormalization': (F,),
    'LpPool': (F, '`dilations` must be empty or all ones'),
    'MatMul': (F,),
    'Max': (FI,),
    'MaxPool': (F, ('2D or 3D pooling only. `Indices` output tensor unsupported. `dilations` must be empty or all ones')),
    'Mean': (('FP32', 'FP16', 'BF16', 'FP8', 'INT32', 'INT64'),),
    'MeanVarianceNormalization': (F,),
    'Min': (FI,),
    'Mish': (('FP32', 'FP16'),),
    'Mod': (FI,),
    'Mul': (FI,),
    'Neg': (FI,),
    'NonMaxSuppression': (('FP32', 'FP16'),),
    'NonZero': (('FP32', 'FP16'),),
    'Not': (B,),
    'OneHot': (FIB, '`depth` must be a build-time constant'),
    'Or': (B,),
    'Pad': (FI, '`axes` must be an initializer'),
    'ParametricSoftplus': (F,),
    'Pow': (F,),
    'PRelu': (F,),
    'QuantizeLinear': (F, '`y_zero_point` must be 0'),
    'RandomNormal': (F, '`seed` value is ignored by TensorRT'),
    'RandomNormalLike': (F, '`seed` value is ignored by TensorRT'),
    'RandomUniform': (F, '`seed` value is ignored by TensorRT'),
    'RandomUniformLike': (F, '`seed` value is ignored by TensorRT'),
    'Range': (FI,),
    'Reciprocal': (F,),
    'ReduceL1': (FI, '`axes` must be an initializer'),
    'ReduceL2': (FI, '`axes` must be an initializer'),
    'ReduceLogSum': (FI, '`axes` must be an initializer'),
    'ReduceLogSumExp': (FI, '`axes` must be an initializer'),
    'ReduceMax': (FI, '`axes` must be an initializer'),
    'ReduceMean': (FI, '`axes` must be an initializer'),
    'ReduceMin': (FI, '`axes` must be an initializer'),
    'ReduceProd': (FI, '`axes` must be an initializer'),
    'ReduceSum': (FI, '`axes` must be an initializer'),
    'ReduceSumSquare': (FI, '`axes` must be an initializer'),
    'Relu': (FI,),
    'Reshape': (FIB,),
    'Resize': (F, ('Supported resize transformation modes: `half_pixel`, `pytorch_half_pixel`, `tf_half_pixel_for_nn`, '
                   '`asymmetric`, and `align_corners`. Supported resize modes: `nearest`, `linear`. Supported nearest '
                   'modes: `floor`, `ceil`, `round_prefer_floor`, `round_prefer_ceil`. Supported aspect ratio policy: '
                   '`stretch`. When `scales` is a tensor input, `axes` must be an iota vector of length rank(input). '
                   'Antialiasing is not supported.')),
    'ReverseSequence': (FIB,),
    'RNN': (F, 'For bidirectional RNNs, activation functions must be the same for both the forward and reverse pass'),
    'RoiAlign': (('FP32', 'FP16'),),
    'Round': (F,),
    'ScaledTanh': (F,),
    'Scan': (F,),
    'Scatter': (FI,),
    'ScatterElements': (FI,),
    'ScatterND': (FI, '`reduction` is not supported'),
    'Selu': (F,),
    'Shape': (FIB,),
    'Shrink': (FI,),
    'Sigmoid': (F,),
    'Sign': (FI,),
    'Sin': (F,),
    'Sinh': (F,),
    'Size': (FIB,),
    'Slice': (FIB, '`axes` must be an initializer'),
    'Softmax': (F,),
    'Softplus': (F,),
    'Softsign': (F,),
    'SpaceToDepth': (FI,),
    'Split': (FIB,),
    'Sqrt': (F,),
    'Squeeze': (FIB, '`axes` must be an initializer'),
    'Sub': (FI,),
    'Sum': (FI,),
    'Tan': (F,),
    'Tanh': (F,),
    'ThresholdedRelu': (F,),
    'Tile': (FIB,),
    'TopK': (FI, '`sorted` must be 1. `K` input must be less than 3840.'),
    'Transpose': (FIB,),
    'Trilu': (FIB,),
    'Unsqueeze': (FIB, '`axes` must be a constant tensor'),
    'Upsample': (F,),
    'Where': (FIB,),
    'Xor': (B,),
}

OPERATORS: dict[str, OpSupport] = {op: OpSupport(frozenset(TYPES[t] for t in row[0]), *row[1:])
                                   for op, row in _TABLE.items()}
#: The table's "N" rows: the parser has no importer for them.
UNSUPPORTED = frozenset({
    'AffineGrid', 'Bernoulli', 'BitShift', 'BitwiseAnd', 'BitwiseNot', 'BitwiseOr', 'BitwiseXor', 'BlackmanWindow',
    'Col2Im', 'CenterCropPad', 'Compress', 'ConcatFromSequence', 'ConvInteger', 'DFT', 'Det',
    'DynamicQuantizeLinear', 'HammingWindow', 'HannWindow', 'ImageDecoder', 'MatMulInteger', 'MaxRoiPool',
    'MaxUnpool', 'MelWeightMatrix', 'Multinomial', 'NegativeLogLikelihoodLoss', 'Optional', 'OptionalGetElement',
    'OptionalHasElement', 'QLinearConv', 'QLinearMatMul', 'RegexFullMatch', 'STFT', 'SequenceAt',
    'SequenceConstruct', 'SequenceEmpty', 'SequenceErase', 'SequenceInsert', 'SequenceLength', 'SequenceMap',
    'SoftmaxCrossEntropyLoss', 'SplitToSequence', 'StringConcat', 'StringNormalizer', 'StringSplit',
    'TfIdfVectorizer', 'Unique'
})


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


__all__ = ["CHECKS", "IO_ONLY_TYPES", "NEWER_OPSET_NOTES", "OPERATORS", "OPSET_RANGE", "OpSupport", "PARSER_SOURCE",
           "QUANTIZED_TYPES", "TENSORRT_TYPES", "TENSORRT_VERSION", "TYPES", "UNSUPPORTED", "check_tensorrt_graph",
           "is_constant", "require_tensorrt_graph", "typed_values"]
