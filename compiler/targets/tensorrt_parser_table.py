"""What TensorRT's ONNX parser takes, as data: its operator table and tensor types (the static check of a graph
against them is :mod:`.tensorrt_support`).

``docs/operators.md`` of ``onnx/onnx-tensorrt`` at the newest 10.x release in the snapshot this was written from (tag
``release/10.1-GA``, commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c). TensorRT's later 10.x parsers add operators; a
graph this table accepts is therefore taken by them too, not the other way round.

* :data:`OPERATORS`: ai.onnx op type -> the tensor types its importer takes and the table's restrictions (text,
  verbatim). Ops marked unsupported are :data:`UNSUPPORTED`; ops past opset 20 (``RMSNormalization``,
  ``RotaryEmbedding``, ``Attention``) are in neither: the parser has no importer for them.
* :data:`TYPES`: the table's header. INT8, INT4 and FP8 are :data:`QUANTIZED_TYPES`, UINT8 is for network inputs
  and outputs (:data:`IO_ONLY_TYPES`).
* :data:`OPSET_RANGE`: the ai.onnx opsets the table covers; :data:`NEWER_OPSET_NOTES`: ops ember emits whose meaning
  changed after them.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

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


__all__ = ["IO_ONLY_TYPES", "NEWER_OPSET_NOTES", "OPERATORS", "OPSET_RANGE", "OpSupport", "PARSER_SOURCE",
           "QUANTIZED_TYPES", "STANDARD_DOMAINS", "TENSORRT_TYPES", "TENSORRT_VERSION", "TYPES", "UNSUPPORTED"]
