"""``ember.PagedAttention``: ``ember.CachedAttention`` over a pool of fixed-size pages instead of one slot per row.

The KV cache of a layer is a pool ``[pool_rows, kv_heads, head_dim]`` with ``pool_rows = num_pages *
page_size``; position ``p`` of row ``b`` lives in pool row ``page_table[b, p // page_size] * page_size +
p % page_size``. Rows may share (full, read-only) pages, which is what prefix caching needs, and a row's
pages need not be contiguous or in any order.

Rows are right-padded: row ``b`` holds ``input_lengths[b]`` new tokens at positions ``p = cache_lengths[b] +
i``. The op first writes each new token's key (rotary applied, as CachedAttention does) and value at pool row
``slot_mapping[b, i]`` (which must be where the page table puts position ``p``), then attends every new token
to its row's positions ``j <= p`` (and ``j > p - sliding_window`` with a window), read through the page
table from the updated pool. Any mix of rows works in one call: a prompt (``cache_lengths`` 0), a decode
token, several tokens after a cached prefix (chunked prefill, prefix-cache hits).

Padding: ``page_table`` is padded with page 0 and the slot mapping of padding tokens (``i >=
input_lengths[b]``) points into page 0 too, a scratch page the runtime never gives to a sequence. An
implementation may write padding tokens' K/V there (the ort-cpu lowering does; the reference does not); the
scratch page's contents are unspecified, as are the outputs at padding tokens (the reference returns zeros).
The page table must cover every row's ``cache_lengths + input_lengths`` positions.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx.defs import OpSchema

from ..graph import current_graph
from ..ops import dims, dtype
from ..versions import EMBER_DOMAIN, EMBER_OPSET
from .attention import (ACTIVATION_TYPES, HEAD_ATTRIBUTES, LENGTH_INPUTS, NEW_TOKEN_INPUTS, OPTION_ATTRIBUTES,
                        OUTPUT, ROTARY_INPUTS, attention_reference, option_attributes)

SCHEMA = OpSchema(
    "PagedAttention", EMBER_DOMAIN, EMBER_OPSET,
    doc=__doc__,
    inputs=[
        *NEW_TOKEN_INPUTS,
        OpSchema.FormalParameter("key_cache", "T", "[num_pages * page_size, kv_num_heads, head_dim]"),
        OpSchema.FormalParameter("value_cache", "T", "[num_pages * page_size, kv_num_heads, head_dim]"),
        OpSchema.FormalParameter("page_table", "I", "[batch, pages]: page ids of each row, in order; padded with 0"),
        OpSchema.FormalParameter("slot_mapping", "L", "[batch, seq]: pool row of each new token; padding -> page 0"),
        *LENGTH_INPUTS,
        *ROTARY_INPUTS,
    ],
    outputs=[
        OUTPUT,
        OpSchema.FormalParameter("key_cache_out", "T", "key_cache with the new keys written"),
        OpSchema.FormalParameter("value_cache_out", "T", "value_cache with the new values written"),
    ],
    type_constraints=[ACTIVATION_TYPES, ("I", ["tensor(int32)"], "lengths and page ids"),
                      ("L", ["tensor(int64)"], "pool rows")],
    attributes=[*HEAD_ATTRIBUTES,
                OpSchema.Attribute("page_size", OpSchema.AttrType.INT, "tokens per page", required=True),
                *OPTION_ATTRIBUTES],
)


def paged_attention(query: ir.Value, key: ir.Value, value: ir.Value, key_cache: ir.Value, value_cache: ir.Value,
                    page_table: ir.Value, slot_mapping: ir.Value, cache_lengths: ir.Value, input_lengths: ir.Value,
                    cos_cache: ir.Value | None, sin_cache: ir.Value | None, *, num_heads: int, kv_num_heads: int,
                    page_size: int, scale: float = 0.0, softcap: float = 0.0, sliding_window: int = 0,
                    rotary_interleaved: bool = False) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Emit ``ember.PagedAttention``; returns ``(output, key_cache_out, value_cache_out)``."""
    inputs: list[ir.Value | None] = [query, key, value, key_cache, value_cache, page_table, slot_mapping, cache_lengths,
                                     input_lengths]
    if cos_cache is not None:
        inputs += [cos_cache, sin_cache]
    attrs = {"num_heads": num_heads, "kv_num_heads": kv_num_heads, "page_size": int(page_size),
             **option_attributes(scale, softcap, sliding_window, rotary_interleaved)}
    pool_shape = dims(key_cache)
    out, key_out, value_out = current_graph().add_node(
        "PagedAttention", inputs, attrs, domain=EMBER_DOMAIN,
        outputs=[(dtype(query), dims(query)), (dtype(key_cache), pool_shape), (dtype(value_cache), pool_shape)])
    return out, key_out, value_out


def pool_rows(page_table: np.ndarray, positions: np.ndarray, page_size: int) -> np.ndarray:
    """Pool rows of ``positions`` ``[..., n]`` of one row's page table ``[pages]``."""
    return page_table[positions // page_size].astype(np.int64) * page_size + positions % page_size


def paged_attention_reference(query, key, value, key_cache, value_cache, page_table, slot_mapping, cache_lengths,
                              input_lengths, cos_cache=None, sin_cache=None, *, num_heads: int, kv_num_heads: int,
                              page_size: int, scale: float = 0.0, softcap: float = 0.0, sliding_window: int = 0,
                              rotary_interleaved: int = 0):
    """numpy semantics of ``ember.PagedAttention`` (see the module doc).

    Each row's pages are gathered into a contiguous cache and handed to CachedAttention's reference, so the
    two ops share one meaning (rotary, window, grouping, scale, soft-capping); this function only adds the paging.
    """
    batch, pages = page_table.shape
    length = pages * page_size
    positions = np.arange(length)
    rows = np.stack([pool_rows(page_table[b], positions, page_size) for b in range(batch)])  # [batch, length]
    past_key = key_cache[rows].transpose(0, 2, 1, 3)  # [batch, kv_heads, length, head_dim]
    past_value = value_cache[rows].transpose(0, 2, 1, 3)
    out, present_key, present_value = attention_reference(
        query, key, value, past_key, past_value, cache_lengths, input_lengths, cos_cache, sin_cache,
        num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, softcap=softcap, sliding_window=sliding_window,
        rotary_interleaved=rotary_interleaved)
    key_out, value_out = key_cache.copy(), value_cache.copy()
    for b in range(batch):
        start, n = int(cache_lengths[b]), int(input_lengths[b])
        if start + n > length:
            raise ValueError(f"row {b}: {start + n} positions, but its page table covers {length}")
        expected = pool_rows(page_table[b], start + np.arange(n), page_size)
        if not np.array_equal(slot_mapping[b, :n], expected):
            raise ValueError(f"row {b}: slot_mapping {slot_mapping[b, :n].tolist()} is not where its page table "
                             f"puts positions {start}..{start + n - 1} ({expected.tolist()})")
        key_out[slot_mapping[b, :n]] = present_key[b, :, start:start + n].transpose(1, 0, 2)
        value_out[slot_mapping[b, :n]] = present_value[b, :, start:start + n].transpose(1, 0, 2)
    return out, key_out, value_out
