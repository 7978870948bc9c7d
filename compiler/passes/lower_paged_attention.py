"""Lower ``ember.PagedAttention`` to standard ONNX ops: ScatterND, Gather, explicit attention.

ort-cpu's form, and the one for targets whose parser or kernels take only standard ops (tensorrt; ort-cuda in
float32). Each row's result is the same whatever else the step holds (the MatMuls, Where and Softmax work row by
row), so a multi-token verification row of speculative decoding, or a prompt's chunk, gives the bits a one-token
step would. Two shorter forms measured on onnxruntime 1.32 CPU, BENCHMARKS.md "Paged decode path": one
``Attention`` (ai.onnx 23) per layer, 5-8 % faster per step at short contexts, but its kernel's results move in
the last bits with the number of query tokens (which flips near-tied tokens of 4-bit models, whose int8
activations magnify them); GroupQueryAttention over the gathered pages, slower everywhere.

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
4. Grouped attention with a boolean mask (``explicit_attention.grouped_attention``, shared with the contiguous
   fallback).

In place: onnxruntime's CPU ScatterND (``core/providers/cpu/tensor/scatter_nd.cc``, ``PrepareForCompute``)
copies its input into its output only ``if (src_base != dst_base)``. When the runtime binds one OrtValue as
both ``key_cache.{i}`` and ``key_cache_out.{i}`` (IOBinding), the kernel's output is that preallocated buffer,
the pointers are equal, and only the new rows are written: a step costs O(new tokens), not O(pool).
``tools/bench_paged_scatter.py`` measures it (a decode step's time does not grow with the pool's size; bound
to separate buffers it grows linearly). Bind the same OrtValue for input and output, not two OrtValues over
the same memory made separately (that works too: the check compares pointers).

Padding K/V land in page 0, which other rows gather (padding page-table entries) and mask; the runtime fills new
pools with finite values (zeros), see ``explicit_attention`` for why.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.versions import EMBER_DOMAIN

from .base import input_at, nodes_of, replace_node
from .explicit_attention import SharedValues, grouped_attention, rotate
from .lowering_record import Lowering, record_lowering

FORM = "ScatterND + Gather + explicit attention"


class _Shared(SharedValues):
    """Values computed once per graph from the lengths, the page table and the slot mapping."""

    def __init__(self, model: ir.Model, tape: ir.tape.Tape, node: ir.Node, page_size: int, prefix: str):
        page_table, slot_mapping, cache_lengths, input_lengths = (input_at(node, i) for i in range(5, 9))
        super().__init__(model, tape, prefix, cache_lengths, input_lengths)
        op = self.op
        self.page_size = page_size
        seq = op("Squeeze", [op("Shape", [slot_mapping], {"start": 1, "end": 2}), self.const(np.array([0]))])
        pages = op("Squeeze", [op("Shape", [page_table], {"start": 1, "end": 2}), self.const(np.array([0]))])
        self.start(seq, op("Mul", [pages, self.const(np.array(page_size, np.int64))], name=f"{prefix}/max_len"))
        self.slots = op("Unsqueeze", [slot_mapping, self.const(np.array([-1]))])  # ScatterND indices [batch, seq, 1]
        self.page_table = page_table
        self._rows: ir.Value | None = None
        self._head_rows: dict[int, ir.Value] = {}

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


def _lower_one(node: ir.Node, tape: ir.tape.Tape, shared: _Shared) -> list[ir.Value]:
    query, key, value, key_cache, value_cache = (input_at(node, i) for i in range(5))
    kv_heads = int(node.attributes["kv_num_heads"].value)
    head_dim = key_cache.shape[2] if key_cache.shape is not None else None
    if not isinstance(head_dim, int):
        raise ValueError(f"{node.name}: the KV cache's head_dim must be static, got {key_cache.shape}")
    op, const = tape.op, shared.const
    cos, sin = (list(node.inputs[9:11]) + [None, None])[:2]
    query, key = rotate(shared, node, query, key, cos, sin, head_dim)
    per_token = const(np.array([0, 0, kv_heads, head_dim], np.int64))
    caches = []
    for which, new, cache in (("key", key, key_cache), ("value", value, value_cache)):
        written = op("ScatterND", [cache, shared.slots, op("Reshape", [new, per_token])],
                     name=f"{node.name}/{which}_cache_write")
        flat = op("Reshape", [written, const(np.array([-1, head_dim], np.int64))])  # [pool_rows * kv, hd]
        read = op("Gather", [flat, shared.head_rows(kv_heads)], {"axis": 0}, name=f"{node.name}/{which}_read")
        caches.append((written, read))
    (key_out, keys), (value_out, values) = caches  # [batch, kv, max_len, hd]
    return [grouped_attention(shared, node, query, keys, values, head_dim), key_out, value_out]


def lower_paged_attention(model: ir.Model) -> ir.Model:
    """Replace every ``ember.PagedAttention`` by standard ops (see the module doc)."""
    shared: dict[tuple, _Shared] = {}
    for node in nodes_of(model, "PagedAttention", EMBER_DOMAIN):
        tape = ir.tape.Tape()
        page_size = int(node.attributes["page_size"].value)
        key = (page_size, *(input_at(node, i).name for i in range(5, 9)))  # page table, slot mapping, lengths
        if key not in shared:
            prefix = "/model/paged_attention" + f"_{len(shared)}" * bool(shared)
            shared[key] = _Shared(model, tape, node, page_size, prefix)
        shared[key].tape = tape
        outputs = _lower_one(node, tape, shared[key])
        replace_node(model, node, list(tape.nodes), outputs)
        record_lowering(model, Lowering(node.name or "", "PagedAttention", FORM))
    return model
