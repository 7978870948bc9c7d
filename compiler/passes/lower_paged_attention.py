"""Lower ``ember.PagedAttention`` to standard ONNX ops (onnxruntime CPU): ScatterND, Gather, explicit attention.

Per layer:

1. ``RotaryEmbedding`` (ai.onnx 23) rotates q and k at positions ``cache_lengths[b] + i`` (clamped to the
   table, so that padding tokens past the last position do not fail the kernel's bounds check).
2. ``ScatterND(key_cache, slot_mapping[..., None], k)`` writes the new keys ``[batch, seq, kv, hd]`` into the
   pool ``[pool_rows, kv, hd]`` (values alike); its output is the graph output ``key_cache_out.{i}``. Padding
   tokens are written too, into page 0 (the scratch page their slot mapping points to).
3. ``Gather`` through the page table reads the updated pool, seen as ``[pool_rows * kv, hd]``, at the rows
   ``(page_table[b, j // page_size] * page_size + j % page_size) * kv + h``: ``[batch, kv, max_len, hd]``,
   positions in order, already in the layout attention multiplies. (Gathering whole pages,
   ``[batch, pages, page_size, kv, hd]``, needs a Transpose to put kv before positions afterwards; that
   was 20-40 % slower per decode step at 512 and 4096 cached tokens, ``tools/bench_paged_scatter.py``'s layer.)
   The row indices depend only on the page table, so they are computed once per graph.
4. Attention with the query heads grouped by reshape, ``[batch, kv, group * seq, hd]``, so that each kv head
   meets its whole group of query heads in one MatMul and K/V are never repeated; a boolean mask (causal,
   ``j < cache_lengths + input_lengths``, the sliding window) selects the scores by ``Where`` before Softmax.
   The masks depend only on the lengths, so each is built once per graph and shared by the layers.

In place: onnxruntime's CPU ScatterND (``core/providers/cpu/tensor/scatter_nd.cc``, ``PrepareForCompute``)
copies its input into its output only ``if (src_base != dst_base)``. When the runtime binds one OrtValue as
both ``key_cache.{i}`` and ``key_cache_out.{i}`` (IOBinding), the kernel's output is that preallocated buffer,
the pointers are equal, and only the new rows are written: a step costs O(new tokens), not O(pool).
``tools/bench_paged_scatter.py`` measures it (a decode step's time does not grow with the pool's size; bound
to separate buffers it grows linearly). Bind the same OrtValue for input and output, not two OrtValues over
the same memory made separately (that works too: the check compares pointers).

Masked scores take the dtype's lowest finite value rather than -inf, so a query with no visible key (a
padding token past a window) gives finite garbage instead of NaN: padding K/V land in page 0, which other
rows gather (padding page-table entries) and mask, and ``0 * NaN`` in the probabilities' product with V would
spread NaN to real tokens. For the same reason the runtime must fill new pools with finite values (zeros).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.versions import EMBER_DOMAIN

from .base import nodes_of, replace_node


def _constant(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(np.asarray(array), name=name)
    value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape))
    model.graph.register_initializer(value)
    return value


class _Shared:
    """Values computed once per graph from the lengths, the page table and the slot mapping."""

    def __init__(self, model: ir.Model, tape: ir.tape.Tape, node: ir.Node, page_size: int, prefix: str):
        _, _, _, _, _, page_table, slot_mapping, cache_lengths, input_lengths, *_ = node.inputs
        self.model, self.prefix = model, prefix
        self._constants: dict[tuple, ir.Value] = {}
        self.page_size = page_size
        self.tape = tape
        op = self.op
        i64 = ir.DataType.INT64
        self.zero, self.one = self.const(np.array(0, np.int64)), self.const(np.array(1, np.int64))
        cache = op("Cast", [cache_lengths], {"to": i64}, name=f"{self.prefix}/cache_lengths")
        total = op("Add", [cache, op("Cast", [input_lengths], {"to": i64})], name=f"{self.prefix}/total_lengths")
        seq = op("Squeeze", [op("Shape", [slot_mapping], {"start": 1, "end": 2}), self.const(np.array([0]))])
        pages = op("Squeeze", [op("Shape", [page_table], {"start": 1, "end": 2}), self.const(np.array([0]))])
        max_len = op("Mul", [pages, self.const(np.array(page_size, np.int64))], name=f"{self.prefix}/max_len")
        # positions of the new tokens [batch, seq] (and [batch, seq, 1]) and of the keys [1, 1, max_len]
        new = op("Range", [self.zero, seq, self.one])
        self.positions = op("Add", [op("Unsqueeze", [cache, self.const(np.array([1]))]),
                                    op("Unsqueeze", [new, self.const(np.array([0]))])],
                            name=f"{self.prefix}/positions")  # [batch, seq]
        self.query_positions = op("Unsqueeze", [self.positions, self.const(np.array([2]))])
        self.key_positions = op("Unsqueeze", [op("Range", [self.zero, max_len, self.one]),
                                              self.const(np.array([0, 1]))])
        visible = op("Less", [self.key_positions, op("Unsqueeze", [total, self.const(np.array([1, 2]))])])
        causal = op("LessOrEqual", [self.key_positions, self.query_positions])
        self.base_mask = op("And", [causal, visible], name=f"{self.prefix}/mask")  # [batch, seq, max_len]
        self.slots = op("Unsqueeze", [slot_mapping, self.const(np.array([-1]))])  # ScatterND indices [batch, seq, 1]
        self.page_table = page_table
        self._rows: ir.Value | None = None
        self._head_rows: dict[int, ir.Value] = {}
        self._masks: dict[tuple[int, int], ir.Value] = {}
        self._rotary_positions: dict[str, ir.Value] = {}

    def op(self, *args, **kwargs) -> ir.Value:
        """Add a node to the tape of the layer being lowered (values made for one layer serve the next)."""
        return self.tape.op(*args, **kwargs)

    def head_rows(self, kv_heads: int) -> ir.Value:
        """``[batch, kv, max_len]``: rows of the pool seen as ``[pool_rows * kv, hd]``, in position order."""
        if kv_heads not in self._head_rows:
            op = self.op
            if self._rows is None:
                base = op("Mul", [op("Cast", [self.page_table], {"to": ir.DataType.INT64}),
                                  self.const(np.array(self.page_size, np.int64))])
                rows = op("Add", [op("Unsqueeze", [base, self.const(np.array([2]))]),
                                  self.const(np.arange(self.page_size, dtype=np.int64))])  # [batch, pages, page_size]
                self._rows = op("Reshape", [rows, self.const(np.array([0, -1], np.int64))],
                                name=f"{self.prefix}/rows")
            scaled = op("Mul", [op("Unsqueeze", [self._rows, self.const(np.array([1]))]),
                                self.const(np.array(kv_heads, np.int64))])
            heads = self.const(np.arange(kv_heads, dtype=np.int64)[:, None])
            self._head_rows[kv_heads] = op("Add", [scaled, heads], name=f"{self.prefix}/rows_{kv_heads}_heads")
        return self._head_rows[kv_heads]

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
            mask = self.base_mask
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
        if cos.name not in self._rotary_positions:
            op = self.op
            last = op("Sub", [op("Shape", [cos], {"start": 0, "end": 1}), self.one])
            self._rotary_positions[cos.name] = op("Min", [self.positions, last],
                                                  name=f"{self.prefix}/rotary_positions")
        return self._rotary_positions[cos.name]


def _lower_one(model: ir.Model, node: ir.Node, tape: ir.tape.Tape, shared: _Shared) -> list[ir.Value]:
    query, key, value, key_cache, value_cache, _, _, _, _, *rotary = node.inputs
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    group = heads // kv_heads
    head_dim = key_cache.shape[2]
    if not isinstance(head_dim, int):
        raise ValueError(f"{node.name}: the KV cache's head_dim must be static, got {key_cache.shape}")
    scale = float(attrs.get("scale", 0.0)) or 1.0 / np.sqrt(head_dim)
    dtype = query.dtype.numpy()
    name = node.name
    op, const = tape.op, shared.const
    cos, sin = (rotary + [None, None])[:2]
    if cos is not None:
        positions = shared.rotary_positions(cos)
        rotary_dim = 2 * cos.shape[1] if cos.shape is not None and isinstance(cos.shape[1], int) else head_dim
        rope = {"interleaved": int(attrs.get("rotary_interleaved", 0)),
                "rotary_embedding_dim": 0 if rotary_dim == head_dim else rotary_dim}
        query = op("RotaryEmbedding", [query, cos, sin, positions], {**rope, "num_heads": heads},
                   name=f"{name}/q_rotary")
        key = op("RotaryEmbedding", [key, cos, sin, positions], {**rope, "num_heads": kv_heads},
                 name=f"{name}/k_rotary")

    per_token = const(np.array([0, 0, kv_heads, head_dim], np.int64))
    caches = []
    for which, new, cache in (("key", key, key_cache), ("value", value, value_cache)):
        written = op("ScatterND", [cache, shared.slots, op("Reshape", [new, per_token])],
                     name=f"{name}/{which}_cache_write")
        flat = op("Reshape", [written, const(np.array([-1, head_dim], np.int64))])  # [pool_rows * kv, hd]
        read = op("Gather", [flat, shared.head_rows(kv_heads)], {"axis": 0}, name=f"{name}/{which}_read")
        caches.append((written, read))
    (key_out, keys), (value_out, values) = caches  # [batch, kv, max_len, hd]
    keys = op("Transpose", [keys], {"perm": [0, 1, 3, 2]})  # onnxruntime folds it into the MatMul (transB)

    # query heads h = kv * group + g: [batch, seq, kv, group, hd] -> [batch, kv, group * seq, hd]
    q = op("Reshape", [query, const(np.array([0, 0, kv_heads, group, head_dim], np.int64))])
    q = op("Transpose", [q], {"perm": [0, 2, 3, 1, 4]})
    q = op("Reshape", [q, const(np.array([0, 0, -1, head_dim], np.int64))])
    q = op("Mul", [q, const(np.array(scale, dtype))])
    scores = op("MatMul", [q, keys], name=f"{name}/scores")  # [batch, kv, group * seq, max_len]
    scores = op("Where", [shared.mask(int(attrs.get("sliding_window", 0)), group), scores,
                          const(np.array(np.finfo(dtype).min, dtype))])
    probs = op("Softmax", [scores], {"axis": -1})
    out = op("MatMul", [probs, values], name=f"{name}/context")  # [batch, kv, group * seq, hd]
    out = op("Reshape", [out, const(np.array([0, 0, group, -1, head_dim], np.int64))])
    out = op("Transpose", [out], {"perm": [0, 3, 1, 2, 4]})  # [batch, seq, kv, group, hd]
    out = op("Reshape", [out, const(np.array([0, 0, heads * head_dim], np.int64))], name=f"{name}/output")
    return [out, key_out, value_out]


def lower_paged_attention(model: ir.Model) -> ir.Model:
    """Replace every ``ember.PagedAttention`` by standard ops (see the module doc)."""
    shared: dict[tuple, _Shared] = {}
    for node in nodes_of(model, "PagedAttention", EMBER_DOMAIN):
        tape = ir.tape.Tape()
        page_size = int(node.attributes["page_size"].value)
        key = (page_size, *(v.name for v in node.inputs[5:9]))  # page table, slot mapping, lengths
        if key not in shared:
            prefix = "/model/paged_attention" + f"_{len(shared)}" * bool(shared)
            shared[key] = _Shared(model, tape, node, page_size, prefix)
        shared[key].tape = tape
        outputs = _lower_one(model, node, tape, shared[key])
        replace_node(model, node, list(tape.nodes), outputs)
    return model
