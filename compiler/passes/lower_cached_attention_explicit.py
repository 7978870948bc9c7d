"""Lower ``ember.CachedAttention`` to standard ONNX ops: the fallback for shapes GroupQueryAttention rejects.

onnxruntime's GroupQueryAttention takes head sizes that are multiples of 8 only (16 with rotary in the kernel;
``lower_attention_gqa.gqa_rejection``). Valid models have others (``head_dim`` 12, 20, ...); their attention
nodes stay ``CachedAttention`` after that pass and become, per layer:

1. ``RotaryEmbedding`` (ai.onnx 23) of q and k (any head size; ``explicit_attention.rotate``).
2. ``ScatterND(past_key, indices, k)`` writes the new keys ``[batch, kv, seq, hd]`` at ``(b, h,
   cache_lengths[b] + i)`` into the slot ``[batch, kv, max_len, hd]``; its output is the graph output
   ``present_key`` (values alike). The runtime binds one OrtValue as both past and present (as for
   GroupQueryAttention), so onnxruntime's ScatterND writes in place: O(new tokens) per step (see
   ``lower_paged_attention`` for the kernel's pointer check). Positions are clamped to the slot so that the
   padding tokens of a right-padded first prompt cannot index past it; they write garbage behind their row's
   length, which stays masked until real tokens overwrite it.
3. ``Slice`` of the updated slot to the longest row's total length, then grouped attention with a boolean mask
   (``explicit_attention.grouped_attention``, shared with the paged lowering).

It is slower than the fused kernel (about twenty small ops a layer instead of one), which is why it is only the
fallback; every choice is recorded per node in the manifest (``lowering_record``).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.versions import EMBER_DOMAIN

from .base import input_at, nodes_of, replace_node
from .explicit_attention import SharedValues, grouped_attention, rotate
from .lowering_record import Lowering, record_lowering

FORM = "ScatterND + explicit attention"


class _Shared(SharedValues):
    """Per graph: positions, masks, the longest total length and the ScatterND indices per kv head count."""

    def __init__(self, model: ir.Model, tape: ir.tape.Tape, node: ir.Node, prefix: str):
        query, past_key, cache_lengths, input_lengths = (input_at(node, i) for i in (0, 3, 5, 6))
        super().__init__(model, tape, prefix, cache_lengths, input_lengths)
        op, const = self.op, self.const
        seq = op("Squeeze", [op("Shape", [query], {"start": 1, "end": 2}), const(np.array([0]))])
        self.start(seq, op("ReduceMax", [self.total_lengths], {"keepdims": 0}, name=f"{prefix}/max_len"))
        self.batch = op("Shape", [query], {"start": 0, "end": 1})
        self.seq_1d = op("Shape", [query], {"start": 1, "end": 2})
        self.last_position = op("Sub", [op("Shape", [past_key], {"start": 2, "end": 3}), self.one])
        self._indices: dict[int, ir.Value] = {}

    def indices(self, kv_heads: int) -> ir.Value:
        """``[batch, kv, seq, 3]``: ScatterND indices ``(b, h, position)`` of the new tokens in the slot."""
        if kv_heads not in self._indices:
            op, const = self.op, self.const
            shape = op("Concat", [self.batch, const(np.array([kv_heads], np.int64)), self.seq_1d], {"axis": 0})
            rows = op("Reshape", [op("Range", [self.zero, op("Squeeze", [self.batch, const(np.array([0]))]),
                                               self.one]), const(np.array([-1, 1, 1], np.int64))])
            heads = const(np.arange(kv_heads, dtype=np.int64).reshape(1, kv_heads, 1))
            positions = op("Min", [self.positions, self.last_position])  # [batch, seq], within the slot
            positions = op("Unsqueeze", [positions, const(np.array([1]))])
            parts = [op("Unsqueeze", [op("Expand", [part, shape]), const(np.array([-1]))])
                     for part in (rows, heads, positions)]
            self._indices[kv_heads] = op("Concat", parts, {"axis": -1}, name=f"{self.prefix}/indices_{kv_heads}")
        return self._indices[kv_heads]


def _lower_one(node: ir.Node, tape: ir.tape.Tape, shared: _Shared) -> list[ir.Value]:
    query, key, value, past_key, past_value = (input_at(node, i) for i in range(5))
    kv_heads = int(node.attributes["kv_num_heads"].value)
    head_dim = past_key.shape[3] if past_key.shape is not None else None
    if not isinstance(head_dim, int):
        raise ValueError(f"{node.name}: the KV cache's head_dim must be static, got {past_key.shape}")
    op, const = tape.op, shared.const
    cos, sin = (list(node.inputs[7:9]) + [None, None])[:2]
    query, key = rotate(shared, node, query, key, cos, sin, head_dim)
    per_head = const(np.array([0, 0, kv_heads, head_dim], np.int64))
    ends = op("Unsqueeze", [shared.max_len, const(np.array([0]))])
    caches = []
    for which, new, cache in (("key", key, past_key), ("value", value, past_value)):
        updates = op("Transpose", [op("Reshape", [new, per_head])], {"perm": [0, 2, 1, 3]})  # [batch, kv, seq, hd]
        written = op("ScatterND", [cache, shared.indices(kv_heads), updates], name=f"{node.name}/{which}_cache_write")
        read = op("Slice", [written, const(np.array([0], np.int64)), ends, const(np.array([2], np.int64))],
                  name=f"{node.name}/{which}_read")
        caches.append((written, read))
    (key_out, keys), (value_out, values) = caches
    return [grouped_attention(shared, node, query, keys, values, head_dim), key_out, value_out]


def lower_cached_attention_explicit(model: ir.Model) -> ir.Model:
    """Replace every ``ember.CachedAttention`` still in the graph by standard ops (see the module doc)."""
    shared: dict[tuple, _Shared] = {}
    for node in nodes_of(model, "CachedAttention", EMBER_DOMAIN):
        tape = ir.tape.Tape()
        key = tuple(input_at(node, i).name for i in (5, 6))  # the lengths
        if key not in shared:
            prefix = "/model/cached_attention" + f"_{len(shared)}" * bool(shared)
            shared[key] = _Shared(model, tape, node, prefix)
        shared[key].tape = tape
        outputs = _lower_one(node, tape, shared[key])
        replace_node(model, node, list(tape.nodes), outputs)
        record_lowering(model, Lowering(node.name or "", "CachedAttention", FORM))
    return model
