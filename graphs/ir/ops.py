"""Typed op functions over ``onnx_ir`` (in the manner of ``max.graph.ops``).

Each function takes ``ir.Value`` operands, appends one node to the active :class:`~.graph.Graph` and
returns values whose dtype and (symbolic) shape are known, so layers can reason about shapes while they
build and a wrong wiring fails at build time rather than in onnxruntime.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from .graph import Dim, current_graph

INT64 = ir.DataType.INT64
INT32 = ir.DataType.INT32
FLOAT = ir.DataType.FLOAT


def dims(value: ir.Value) -> list[Dim]:
    """The value's shape as a list of ints (static) and strings (symbolic); None where unknown."""
    if value.shape is None:
        raise ValueError(f"value {value.name} has no shape")
    return [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else d) for d in value.shape]


def dtype(value: ir.Value) -> ir.DataType:
    """The value's element type (every value ember's builders make has one)."""
    if value.dtype is None:
        raise ValueError(f"value {value.name} has no element type")
    return value.dtype


def _broadcast(a: list[Dim], b: list[Dim]) -> list[Dim]:
    rank = max(len(a), len(b))
    a = list[Dim]([1] * (rank - len(a))) + a
    b = list[Dim]([1] * (rank - len(b))) + b
    out: list[Dim] = []
    for x, y in zip(a, b):
        if x == 1:
            out.append(y)
        elif y == 1 or x == y:
            out.append(x)
        elif isinstance(x, int) and isinstance(y, int):
            raise ValueError(f"shapes {a} and {b} do not broadcast")
        else:
            out.append(x if isinstance(x, str) else y)
    return out


def _node(op: str, inputs, out_dtype, out_shape, attributes=None, *, domain: str = "", name: str | None = None):
    return current_graph().add_node(op, inputs, attributes, domain=domain, outputs=[(out_dtype, out_shape)],
                                    name=name)[0]


def constant(array, dtype_: np.dtype | None = None, name: str | None = None) -> ir.Value:
    return current_graph().add_constant(np.asarray(array, dtype=dtype_), name=name)


# elementwise ------------------------------------------------------------------------------------
def _binary(op: str, a: ir.Value, b: ir.Value, name: str | None = None) -> ir.Value:
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: dtypes differ ({a.dtype} vs {b.dtype})")
    return _node(op, [a, b], a.dtype, _broadcast(dims(a), dims(b)), name=name)


def add(a: ir.Value, b: ir.Value, name: str | None = None) -> ir.Value:
    return _binary("Add", a, b, name)


def sub(a: ir.Value, b: ir.Value, name: str | None = None) -> ir.Value:
    return _binary("Sub", a, b, name)


def mul(a: ir.Value, b: ir.Value, name: str | None = None) -> ir.Value:
    return _binary("Mul", a, b, name)


def div(a: ir.Value, b: ir.Value, name: str | None = None) -> ir.Value:
    return _binary("Div", a, b, name)


def sigmoid(x: ir.Value) -> ir.Value:
    return _node("Sigmoid", [x], x.dtype, dims(x))


def silu(x: ir.Value) -> ir.Value:
    """x * sigmoid(x); onnxruntime fuses the pair."""
    return mul(x, sigmoid(x), name="SiLU")


def tanh(x: ir.Value) -> ir.Value:
    return _node("Tanh", [x], x.dtype, dims(x))


def gelu(x: ir.Value, approximate: str = "none") -> ir.Value:
    return _node("Gelu", [x], x.dtype, dims(x), {"approximate": approximate})


def cast(x: ir.Value, to: ir.DataType) -> ir.Value:
    return _node("Cast", [x], to, dims(x), {"to": int(to)})


# shapes -----------------------------------------------------------------------------------------
def reshape(x: ir.Value, shape: Sequence[int], out_shape: Sequence[Dim]) -> ir.Value:
    """Reshape with ONNX semantics (0 copies a dim, -1 infers); ``out_shape`` is the resulting shape."""
    return _node("Reshape", [x, constant(np.array(shape, dtype=np.int64))], x.dtype, list(out_shape))


def reshape_dynamic(x: ir.Value, shape: ir.Value, out_shape: Sequence[Dim]) -> ir.Value:
    """Reshape to a shape computed in the graph."""
    return _node("Reshape", [x, shape], x.dtype, list(out_shape))


def concat(values: Sequence[ir.Value], axis: int) -> ir.Value:
    parts = [dims(v) for v in values]
    axis %= len(parts[0])
    total: Dim = 0
    for p in parts:
        size = p[axis]
        total = total + size if isinstance(total, int) and isinstance(size, int) else None
    out = list(parts[0])
    out[axis] = total
    return _node("Concat", list(values), values[0].dtype, out, {"axis": axis})


def transpose(x: ir.Value, perm: Sequence[int]) -> ir.Value:
    d = dims(x)
    return _node("Transpose", [x], x.dtype, [d[p] for p in perm], {"perm": list(perm)})


def unsqueeze(x: ir.Value, axes: Sequence[int]) -> ir.Value:
    d = dims(x)
    rank = len(d) + len(axes)
    axes = sorted(a % rank for a in axes)
    out = list(d)
    for a in axes:
        out.insert(a, 1)
    return _node("Unsqueeze", [x, constant(np.array(axes, dtype=np.int64))], x.dtype, out)


def shape_of(x: ir.Value, start: int = 0, end: int | None = None) -> ir.Value:
    n = len(dims(x))
    stop = n if end is None else end % (n + 1)
    return _node("Shape", [x], INT64, [stop - start % n], {"start": start, "end": end})


# reductions and selection -----------------------------------------------------------------------
def reduce_max(x: ir.Value, axes: Sequence[int] | None = None, keepdims: bool = False) -> ir.Value:
    d = dims(x)
    if axes is None:
        out: list[Dim] = [1] * len(d) if keepdims else []
        inputs = [x]
    else:
        norm = [a % len(d) for a in axes]
        out = [1 if i in norm else v for i, v in enumerate(d)] if keepdims else [v for i, v in enumerate(d) if i not in norm]
        inputs = [x, constant(np.array(norm, dtype=np.int64))]
    return _node("ReduceMax", inputs, x.dtype, out, {"keepdims": int(keepdims)})


def gather(data: ir.Value, indices: ir.Value, axis: int = 0) -> ir.Value:
    d, i = dims(data), dims(indices)
    axis %= len(d)
    return _node("Gather", [data, indices], data.dtype, d[:axis] + i + d[axis + 1:], {"axis": axis})


def gather_nd(data: ir.Value, indices: ir.Value, batch_dims: int = 0) -> ir.Value:
    d, i = dims(data), dims(indices)
    last = i[-1]
    if not isinstance(last, int):
        raise ValueError("gather_nd needs a static last index dimension")
    out = i[:-1] + d[batch_dims + last:]
    return _node("GatherND", [data, indices], data.dtype, out, {"batch_dims": batch_dims})


# linear algebra and normalization ---------------------------------------------------------------
def matmul(a: ir.Value, b: ir.Value, name: str | None = None) -> ir.Value:
    da, db = dims(a), dims(b)
    if isinstance(da[-1], int) and isinstance(db[-2], int) and da[-1] != db[-2]:
        raise ValueError(f"matmul: inner dims differ {da} @ {db}")
    batch = _broadcast(da[:-2], db[:-2]) if len(da) > 2 and len(db) > 2 else (da[:-2] or db[:-2])
    return _node("MatMul", [a, b], a.dtype, batch + [da[-2], db[-1]], name=name)


def gemm(a: ir.Value, b: ir.Value, trans_b: bool = False, name: str | None = None) -> ir.Value:
    da, db = dims(a), dims(b)
    n = db[0] if trans_b else db[1]
    return _node("Gemm", [a, b], a.dtype, [da[0], n], {"transB": int(trans_b)}, name=name)


def rms_norm(x: ir.Value, weight: ir.Value, epsilon: float) -> ir.Value:
    """RMSNormalization (opset 23) over the last axis; targets may replace it with a fused kernel."""
    return _node("RMSNormalization", [x, weight], x.dtype, dims(x), {"axis": -1, "epsilon": float(epsilon)})


def layer_norm(x: ir.Value, weight: ir.Value, bias: ir.Value | None, epsilon: float) -> ir.Value:
    return _node("LayerNormalization", [x, weight, bias], x.dtype, dims(x), {"axis": -1, "epsilon": float(epsilon)})


# encoder ops (BERT family): comparisons, selection, scans, reductions, dynamic slices, attention ---------
BOOL = ir.DataType.BOOL


def equal(a: ir.Value, b: ir.Value) -> ir.Value:
    if a.dtype != b.dtype:
        raise TypeError(f"Equal: dtypes differ ({a.dtype} vs {b.dtype})")
    return _node("Equal", [a, b], BOOL, _broadcast(dims(a), dims(b)))


def less(a: ir.Value, b: ir.Value) -> ir.Value:
    if a.dtype != b.dtype:
        raise TypeError(f"Less: dtypes differ ({a.dtype} vs {b.dtype})")
    return _node("Less", [a, b], BOOL, _broadcast(dims(a), dims(b)))


def not_(x: ir.Value) -> ir.Value:
    return _node("Not", [x], BOOL, dims(x))


def and_(a: ir.Value, b: ir.Value) -> ir.Value:
    return _node("And", [a, b], BOOL, _broadcast(dims(a), dims(b)))


def where(condition: ir.Value, a: ir.Value, b: ir.Value) -> ir.Value:
    if a.dtype != b.dtype:
        raise TypeError(f"Where: dtypes differ ({a.dtype} vs {b.dtype})")
    return _node("Where", [condition, a, b], a.dtype, _broadcast(_broadcast(dims(condition), dims(a)), dims(b)))


def maximum(a: ir.Value, b: ir.Value) -> ir.Value:
    """Elementwise ``Max`` of two values."""
    return _binary("Max", a, b)


def cumsum(x: ir.Value, axis: int) -> ir.Value:
    return _node("CumSum", [x, constant(np.array(axis, dtype=np.int64))], x.dtype, dims(x))


def _reduce(op: str, x: ir.Value, axes: Sequence[int], keepdims: bool) -> ir.Value:
    d = dims(x)
    norm = [a % len(d) for a in axes]
    out = [1 if i in norm else v for i, v in enumerate(d)] if keepdims else [v for i, v in enumerate(d) if i not in norm]
    return _node(op, [x, constant(np.array(norm, dtype=np.int64))], x.dtype, out, {"keepdims": int(keepdims)})


def reduce_sum(x: ir.Value, axes: Sequence[int], keepdims: bool = False) -> ir.Value:
    return _reduce("ReduceSum", x, axes, keepdims)


def reduce_l2(x: ir.Value, axes: Sequence[int], keepdims: bool = False) -> ir.Value:
    """``sqrt(sum(x^2))`` over ``axes``."""
    return _reduce("ReduceL2", x, axes, keepdims)


def arg_max(x: ir.Value, axis: int, keepdims: bool = False, select_last_index: bool = False) -> ir.Value:
    d = dims(x)
    axis %= len(d)
    out = [1 if i == axis else v for i, v in enumerate(d)] if keepdims else [v for i, v in enumerate(d) if i != axis]
    return _node("ArgMax", [x], INT64, out,
                 {"axis": axis, "keepdims": int(keepdims), "select_last_index": int(select_last_index)})


def slice_(x: ir.Value, starts: ir.Value, ends: ir.Value, axes: Sequence[int], out_shape: Sequence[Dim]) -> ir.Value:
    """``Slice`` with (possibly computed) 1-D int64 ``starts``/``ends``; ``out_shape`` is the result's shape."""
    return _node("Slice", [x, starts, ends, constant(np.array(axes, dtype=np.int64))], x.dtype, list(out_shape))


def expand(x: ir.Value, shape: ir.Value, out_shape: Sequence[Dim]) -> ir.Value:
    """Broadcast ``x`` to a shape computed in the graph."""
    return _node("Expand", [x, shape], x.dtype, list(out_shape))


def scaled_dot_product_attention(query: ir.Value, key: ir.Value, value: ir.Value, mask: ir.Value | None, *,
                                 num_heads: int, kv_num_heads: int, scale: float | None = None) -> ir.Value:
    """ONNX ``Attention`` (opset 23) on 3-D ``[batch, seq, heads * head_dim]`` inputs, without a KV cache.

    ``mask`` is added to the scores (float) or selects the keys (bool); onnxruntime wants its shape to be
    ``[batch or 1, heads or 1, q_seq, kv_seq]`` (no broadcasting over the query axis).
    """
    attrs = {"q_num_heads": num_heads, "kv_num_heads": kv_num_heads, "scale": None if scale is None else float(scale)}
    return _node("Attention", [query, key, value, mask], query.dtype, dims(query)[:2] + [dims(value)[2]], attrs)
