"""Lower ``ember.PagedAttention`` for onnxruntime CPU with one ``Attention`` (ai.onnx 23) node per layer.

Steps 1-2 are ``lower_paged_attention``'s (RotaryEmbedding, ScatterND into the pool in place). The read and the
attention differ:

3. ``Gather`` reads whole token rows: the updated pool seen as ``[pool_rows, kv * hd]`` at the rows
   ``page_table[b, j // page_size] * page_size + j % page_size`` gives ``[batch, max_len, kv * hd]``, the 3-D
   layout ``Attention`` takes (onnxruntime's kernel wants q, k and v of the same rank, and q is
   ``[batch, seq, heads * hd]``). The indices depend only on the page table: computed once per graph.
4. ``Attention`` with ``q_num_heads`` / ``kv_num_heads`` (grouped heads in the kernel, K/V never repeated),
   the op's ``scale`` and ``softcap``, and an additive float mask ``[batch, 1, seq, max_len]`` built once per graph
   (and per sliding window) from the lengths: 0 where a key is visible (causal, within the row's total length,
   within the window), the dtype's lowest finite value elsewhere. Lowest rather than -inf for the reason
   ``explicit_attention`` gives: a query that sees no key (an empty row, a padding token past a window) gets
   finite garbage, never NaN that would reach page 0 and, through ``0 * NaN``, the rows that gather it.

One node does what the explicit form spells in about a dozen (reshapes and transposes of q, the scale, two
MatMuls, the mask's Where, Softmax, the output's reshapes), for every kind of step (decode rows at any cache
lengths, padded prompts, a chunk after a prefix, mixed batches): the mask carries the step's shape, so one graph
serves them all. BENCHMARKS.md "Paged decode path" compares the forms per decode step.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .explicit_attention import attention_attributes
from .lower_paged_attention import PagedShared, lower_each_paged_node, write_pools

FORM = "ScatterND + Gather + Attention (ai.onnx 23)"


class _Shared(PagedShared):
    """:class:`PagedShared` plus the additive masks, one per (sliding window, dtype) per graph."""

    def __init__(self, model: ir.Model, tape: ir.tape.Tape, node: ir.Node, page_size: int, prefix: str):
        super().__init__(model, tape, node, page_size, prefix)
        self._additive: dict[tuple[int, str], ir.Value] = {}

    def additive_mask(self, window: int, dtype: np.dtype) -> ir.Value:
        key = (window, np.dtype(dtype).str)
        if key not in self._additive:
            visible = self.mask(window, 1)  # [batch, 1, seq, max_len], True where a key is seen
            self._additive[key] = self.op("Where", [visible, self.const(np.array(0, dtype)),
                                                 self.const(np.array(np.finfo(dtype).min, dtype))],
                                       name=f"{self.prefix}/additive_mask_{window}")
        return self._additive[key]


def _lower_one(node: ir.Node, shared: _Shared) -> list[ir.Value]:
    writes = write_pools(node, shared)
    attrs = attention_attributes(node)
    dtype = node.inputs[0].dtype.numpy()
    row_width = shared.const(np.array([-1, writes.kv_heads * writes.head_dim], np.int64))
    keys, values = (shared.op("Gather", [shared.op("Reshape", [pool, row_width]), shared.token_rows()], {"axis": 0},
                              name=f"{node.name}/{which}_read")  # [batch, max_len, kv * hd]
                    for which, pool in (("key", writes.key_out), ("value", writes.value_out)))
    mask = shared.additive_mask(int(attrs.get("sliding_window", 0)), dtype)
    options = {"q_num_heads": int(attrs["num_heads"]), "kv_num_heads": writes.kv_heads,
               "scale": float(attrs.get("scale", 0.0)) or float(1.0 / np.sqrt(writes.head_dim))}
    softcap = float(attrs.get("softcap", 0.0))
    if softcap > 0:
        options["softcap"] = softcap
    out = shared.op("Attention", [writes.query, keys, values, mask], options, name=f"{node.name}/attention")
    return [out, writes.key_out, writes.value_out]


def lower_paged_attention_fused(model: ir.Model) -> ir.Model:
    """Replace every ``ember.PagedAttention`` by the form above (see the module doc)."""
    return lower_each_paged_node(model, _Shared, _lower_one, FORM)
