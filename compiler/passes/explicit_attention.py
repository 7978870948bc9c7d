"""Attention over a KV cache in standard ONNX ops: what every cache layout shares once its keys are read.

Two lowerings use it: the paged one (``lower_paged_attention``: keys gathered from a page pool) and the contiguous
fallback (``lower_cached_attention_explicit``: keys sliced from a slot, for models whose shapes
GroupQueryAttention rejects). What they share, and what is therefore written once here:

* ``RotaryEmbedding`` (ai.onnx 23) of q and k at positions ``cache_lengths[b] + i``, clamped to the cos/sin table
  so that padding tokens past the last position do not fail the kernel's bounds check. Unlike
  GroupQueryAttention's in-kernel rotary it takes any head size and rotary dimension.
* Grouped attention: query heads reshaped to ``[batch, kv, group * seq, hd]`` so that each kv head meets its whole
  group of query heads in one MatMul and K/V are never repeated; the op's ``scale`` multiplies q and its
  ``softcap`` (``softcap * tanh(scores / softcap)``) bounds the scores; a boolean mask (causal, ``j < cache_lengths +
  input_lengths``, the sliding window) then selects the scores by ``Where`` before Softmax. The masks depend only on
  the lengths, so each is built once per graph and shared by the layers.

Masked scores take the dtype's lowest finite value rather than -inf, so a query with no visible key (a padding
token past a window) gives finite garbage instead of NaN (``0 * NaN`` in the probabilities' product with V would
spread NaN to real tokens). For the same reason cache buffers must hold finite values (the runtime zeroes them).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import input_at, name_of


def _constant(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    array = np.asarray(array)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape))
    model.graph.register_initializer(value)
    return value


class SharedValues:
    """Values computed once per graph from the lengths (positions, masks) and shared by every layer.

    A cache layout computes, from the lengths, ``seq`` and ``max_len`` (int64 scalars: the new tokens per row, and
    how many cache positions the layers read: the page table's span, or the longest row's total length), then
    calls :meth:`start`."""

    def __init__(self, model: ir.Model, tape: ir.tape.Tape, prefix: str, cache_lengths: ir.Value,
                 input_lengths: ir.Value):
        self.model, self.prefix, self.tape = model, prefix, tape
        self._constants: dict[tuple, ir.Value] = {}
        self._masks: dict[tuple[int, int], ir.Value] = {}
        self._rotary_positions: dict[str, ir.Value] = {}
        op, i64 = self.op, ir.DataType.INT64
        self.zero, self.one = self.const(np.array(0, np.int64)), self.const(np.array(1, np.int64))
        self.cache_lengths = op("Cast", [cache_lengths], {"to": i64}, name=f"{prefix}/cache_lengths")
        self.total_lengths = op("Add", [self.cache_lengths, op("Cast", [input_lengths], {"to": i64})],
                                name=f"{prefix}/total_lengths")

    def start(self, seq: ir.Value, max_len: ir.Value | None = None) -> None:
        """Build the new tokens' positions once ``seq`` is known; the masks also need ``max_len``."""
        op = self.op
        new = op("Range", [self.zero, seq, self.one])
        self.positions = op("Add", [op("Unsqueeze", [self.cache_lengths, self.const(np.array([1]))]),
                                    op("Unsqueeze", [new, self.const(np.array([0]))])],
                            name=f"{self.prefix}/positions")  # [batch, seq]
        self.max_len = max_len
        self._base_mask: ir.Value | None = None

    def base_mask(self) -> ir.Value:
        """``[batch, seq, max_len]``: causal and within each row's total length."""
        if self._base_mask is None:
            op = self.op
            self.query_positions = op("Unsqueeze", [self.positions, self.const(np.array([2]))])
            self.key_positions = op("Unsqueeze", [op("Range", [self.zero, self.max_len, self.one]),
                                                  self.const(np.array([0, 1]))])  # [1, 1, max_len]
            visible = op("Less", [self.key_positions,
                                  op("Unsqueeze", [self.total_lengths, self.const(np.array([1, 2]))])])
            causal = op("LessOrEqual", [self.key_positions, self.query_positions])
            self._base_mask = op("And", [causal, visible], name=f"{self.prefix}/mask")
        return self._base_mask

    def op(self, *args, **kwargs) -> ir.Value:
        """Add a node to the tape of the layer being lowered (values made for one layer serve the next)."""
        return self.tape.op(*args, **kwargs)

    def const(self, array: np.ndarray) -> ir.Value:
        """An initializer, one per distinct value (the layers share their shapes and scalars)."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = _constant(self.model, f"{self.prefix}/const_{len(self._constants)}", array)
        return self._constants[key]

    def mask(self, window: int, group: int) -> ir.Value:
        """``[batch, 1, group * seq, max_len]``: which keys each (query head in the group, token) sees."""
        if (window, group) not in self._masks:
            op = self.op
            mask = self.base_mask()
            if window > 0:
                lowest = op("Sub", [self.query_positions, self.const(np.array(window, np.int64))])
                mask = op("And", [mask, op("Greater", [self.key_positions, lowest])],
                          name=f"{self.prefix}/window_{window}_mask")
            mask = op("Unsqueeze", [mask, self.const(np.array([1]))])  # [batch, 1, seq, max_len]
            if group > 1:
                mask = op("Tile", [mask, self.const(np.array([1, 1, group, 1], np.int64))])
            self._masks[(window, group)] = mask
        return self._masks[(window, group)]

    def rotary_positions(self, cos: ir.Value) -> ir.Value:
        """Positions clamped to the cos/sin table (padding tokens may run past it)."""
        table = name_of(cos)
        if table not in self._rotary_positions:
            op = self.op
            last = op("Sub", [op("Shape", [cos], {"start": 0, "end": 1}), self.one])
            self._rotary_positions[table] = op("Min", [self.positions, last],
                                               name=f"{self.prefix}/rotary_positions")
        return self._rotary_positions[table]


def attention_attributes(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def rotate(shared: SharedValues, node: ir.Node, query: ir.Value, key: ir.Value, cos: ir.Value | None,
           sin: ir.Value | None, head_dim: int) -> tuple[ir.Value, ir.Value]:
    """q and k rotated at their positions by ``RotaryEmbedding`` (unchanged without rotary tables)."""
    if cos is None:
        return query, key
    attrs = attention_attributes(node)
    positions = shared.rotary_positions(cos)
    rotary_dim = 2 * cos.shape[1] if cos.shape is not None and isinstance(cos.shape[1], int) else head_dim
    rope = {"interleaved": int(attrs.get("rotary_interleaved", 0)),
            "rotary_embedding_dim": 0 if rotary_dim == head_dim else rotary_dim}
    query = shared.op("RotaryEmbedding", [query, cos, sin, positions], {**rope, "num_heads": int(attrs["num_heads"])},
                      name=f"{node.name}/q_rotary")
    key = shared.op("RotaryEmbedding", [key, cos, sin, positions], {**rope, "num_heads": int(attrs["kv_num_heads"])},
                    name=f"{node.name}/k_rotary")
    return query, key


def grouped_attention(shared: SharedValues, node: ir.Node, query: ir.Value, keys: ir.Value, values: ir.Value,
                      head_dim: int) -> ir.Value:
    """``[batch, seq, heads * hd]``: attention of ``query`` (rotated) over ``keys`` / ``values``
    ``[batch, kv, max_len, hd]`` (positions in order, the new tokens already written)."""
    attrs = attention_attributes(node)
    heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    group = heads // kv_heads
    scale = float(attrs.get("scale", 0.0)) or 1.0 / np.sqrt(head_dim)
    query_type = input_at(node, 0).dtype  # the emitted ops' outputs carry no type yet
    if query_type is None:
        raise ValueError(f"{node.name}: the query's element type is unknown")
    dtype = query_type.numpy()
    op, const, name = shared.op, shared.const, node.name
    keys = op("Transpose", [keys], {"perm": [0, 1, 3, 2]})  # onnxruntime folds it into the MatMul (transB)
    # query heads h = kv * group + g: [batch, seq, kv, group, hd] -> [batch, kv, group * seq, hd]
    q = op("Reshape", [query, const(np.array([0, 0, kv_heads, group, head_dim], np.int64))])
    q = op("Transpose", [q], {"perm": [0, 2, 3, 1, 4]})
    q = op("Reshape", [q, const(np.array([0, 0, -1, head_dim], np.int64))])
    q = op("Mul", [q, const(np.array(scale, dtype))])
    scores = op("MatMul", [q, keys], name=f"{name}/scores")  # [batch, kv, group * seq, max_len]
    softcap = float(attrs.get("softcap", 0.0))
    if softcap > 0:  # softcap * tanh(scores / softcap), before the mask (as the op's reference)
        cap = const(np.array(softcap, dtype))
        scores = op("Mul", [op("Tanh", [op("Div", [scores, cap])]), cap], name=f"{name}/softcap")
    scores = op("Where", [shared.mask(int(attrs.get("sliding_window", 0)), group), scores,
                          const(np.array(np.finfo(dtype).min, dtype))])
    probs = op("Softmax", [scores], {"axis": -1})
    out = op("MatMul", [probs, values], name=f"{name}/context")  # [batch, kv, group * seq, hd]
    out = op("Reshape", [out, const(np.array([0, 0, group, -1, head_dim], np.int64))])
    out = op("Transpose", [out], {"perm": [0, 3, 1, 2, 4]})  # [batch, seq, kv, group, hd]
    return op("Reshape", [out, const(np.array([0, 0, heads * head_dim], np.int64))], name=f"{name}/output")
