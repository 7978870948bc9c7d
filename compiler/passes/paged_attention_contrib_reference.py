"""numpy semantics of onnxruntime's ``com.microsoft.PagedAttention``, as far as ember uses it.

onnxruntime runs the op on its CUDA execution provider only (``contrib_ops/cuda/bert/paged_attention.cc``; the
schema in ``core/graph/contrib_ops/bert_defs.cc`` says so, and the CPU build of 1.32 registers no kernel), so the
lowering to it (:mod:`.lower_paged_attention_contrib`) cannot be run here. This reference, written from the schema
and ``contrib_ops/cpu/bert/paged_attention_helper.h``, stands in for the node in ``onnx.reference``'s evaluator
(:class:`PagedAttentionOp`), so that the lowered graph's plumbing (unpadding, lengths, slots, the cache layout,
repadding) is checked against ember's own ``ember.PagedAttention`` reference on CPU.

What the op does, for the inputs ember gives it:

* ``query`` ``[tokens, num_heads * head_size]`` (or packed q|k|v ``[tokens, (num_heads + 2 kv) * head_size]`` with
  ``key``/``value`` absent), ``key``/``value`` ``[tokens, kv * head_size]``: the batch's real tokens, packed.
* ``key_cache``/``value_cache`` ``[num_blocks, block_size, kv, head_size]``, updated in place (outputs 1 and 2 are
  the same buffers: the kernel refuses others).
* ``cumulative_sequence_length`` ``[batch + 1]`` (int32): sequence ``b`` owns tokens ``c[b]..c[b + 1] - 1``;
  ``past_seqlens`` ``[batch]``: tokens already cached; token ``i`` of sequence ``b`` sits at position
  ``past_seqlens[b] + i``.
* ``block_table`` ``[batch, max_blocks]`` (int32): position ``p`` lives in block ``block_table[b, p // block_size]``
  at offset ``p % block_size``.
* ``slot_mapping`` ``[tokens]`` (int32, optional): where each token's key/value is written, as a row of the cache
  seen as ``[num_blocks * block_size, kv, head_size]``; -1 skips the write. Absent: derived from the block table.
* ``cos_cache``/``sin_cache`` ``[positions, rotary_dim / 2]`` with ``do_rotary=1``: q and k are rotated at their
  positions before k is written (``rotary_interleaved`` as GroupQueryAttention).
* Attention: causal within each sequence over positions ``0..p`` read through the block table, query heads
  grouped over the kv heads, ``scale`` (0: ``1 / sqrt(head_size)``), ``softcap`` (``softcap * tanh(s / softcap)``).
  ``local_window_size`` is not modelled here: the lowering never sets it (see its rejection check).
"""
from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from ember.graphs.ir.custom.attention import apply_rotary


def paged_attention_contrib_reference(query, key, value, key_cache, value_cache, cumulative_sequence_length,
                                      past_seqlens, block_table, cos_cache=None, sin_cache=None, slot_mapping=None,
                                      *, num_heads: int, kv_num_heads: int, scale: float = 0.0, softcap: float = 0.0,
                                      do_rotary: int = 0, rotary_interleaved: int = 0, local_window_size: int = -1):
    """``(output [tokens, num_heads * head_size], key_cache_out, value_cache_out)`` (see the module doc)."""
    if local_window_size not in (-1, 0):
        raise NotImplementedError("local_window_size is not modelled by this reference")
    if key is None:  # packed q|k|v
        head_size = query.shape[1] // (num_heads + 2 * kv_num_heads)
        query, key, value = np.split(query, [num_heads * head_size, (num_heads + kv_num_heads) * head_size], axis=1)
    tokens = query.shape[0]
    head_size = query.shape[1] // num_heads
    num_blocks, block_size = key_cache.shape[:2]
    if key_cache.shape != (num_blocks, block_size, kv_num_heads, head_size):
        raise ValueError(f"key_cache must be [num_blocks, block_size, {kv_num_heads}, {head_size}], "
                         f"not {list(key_cache.shape)}")
    group = num_heads // kv_num_heads
    scale = scale or 1.0 / np.sqrt(head_size)
    key_out = key_cache.copy().reshape(num_blocks * block_size, kv_num_heads, head_size)
    value_out = value_cache.copy().reshape(num_blocks * block_size, kv_num_heads, head_size)
    out = np.zeros((tokens, num_heads, head_size), dtype=query.dtype)
    q = query.reshape(tokens, num_heads, head_size)
    k = key.reshape(tokens, kv_num_heads, head_size)
    v = value.reshape(tokens, kv_num_heads, head_size)
    for b in range(len(past_seqlens)):
        first, last = int(cumulative_sequence_length[b]), int(cumulative_sequence_length[b + 1])
        past, n = int(past_seqlens[b]), last - first
        positions = past + np.arange(n)
        total = past + n
        if total > block_table.shape[1] * block_size:
            raise ValueError(f"sequence {b}: {total} positions, but its block table covers "
                             f"{block_table.shape[1] * block_size}")
        qb, kb = q[first:last].transpose(1, 0, 2), k[first:last].transpose(1, 0, 2)  # [heads, n, hd]
        if do_rotary:
            qb = apply_rotary(qb, cos_cache[positions], sin_cache[positions], bool(rotary_interleaved))
            kb = apply_rotary(kb, cos_cache[positions], sin_cache[positions], bool(rotary_interleaved))
        rows = block_table[b, np.arange(total) // block_size].astype(np.int64) * block_size + np.arange(total) % block_size
        slots = rows[past:] if slot_mapping is None else slot_mapping[first:last].astype(np.int64)
        for i, slot in enumerate(slots):
            if slot >= 0:
                key_out[slot], value_out[slot] = kb[:, i], v[first + i]
        keys = np.repeat(key_out[rows].transpose(1, 0, 2), group, axis=0).astype(np.float32)  # [heads, total, hd]
        values = np.repeat(value_out[rows].transpose(1, 0, 2), group, axis=0).astype(np.float32)
        scores = qb.astype(np.float32) @ keys.transpose(0, 2, 1) * scale
        if softcap > 0:
            scores = softcap * np.tanh(scores / softcap)
        scores = np.where(np.arange(total)[None, None, :] <= positions[None, :, None], scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[first:last] = ((scores / scores.sum(axis=-1, keepdims=True)) @ values).transpose(1, 0, 2)
    return (out.reshape(tokens, num_heads * head_size), key_out.reshape(key_cache.shape),
            value_out.reshape(value_cache.shape))


class PagedAttentionOp(OpRun):
    """``com.microsoft.PagedAttention`` for ``onnx.reference.ReferenceEvaluator(model, new_ops=[...])``."""

    op_domain = "com.microsoft"

    def _run(self, query, key=None, value=None, key_cache=None, value_cache=None, cumulative_sequence_length=None,
             past_seqlens=None, block_table=None, cos_cache=None, sin_cache=None, slot_mapping=None, *unused,
             **attributes):
        if any(x is not None for x in unused):
            raise NotImplementedError("head_sink, q/k norms, quantized caches and attention_metadata are not modelled")
        return paged_attention_contrib_reference(query, key, value, key_cache, value_cache,
                                                 cumulative_sequence_length, past_seqlens, block_table, cos_cache,
                                                 sin_cache, slot_mapping, **attributes)


PagedAttentionOp.__name__ = "PagedAttention"
