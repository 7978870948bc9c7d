"""``ember.PagedAttention``'s reference means ``ember.CachedAttention`` read through a page table: the same
outputs and the same written K/V, with pages laid out contiguously or shuffled per row, for any mix of prompt,
decode and cached-prefix rows; its schema is registered and the reference evaluator runs it."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

from ember.graphs.ir.custom import attention_reference, paged_attention, paged_attention_reference, \
    reference_evaluator_ops
from ember.graphs.ir.graph import Graph
from ember.graphs.ir.versions import EMBER_DOMAIN

from .paged_cases import make_case

# a prompt, a decode token, a cached prefix extended by 5 tokens, a decode token crossing into a new page
MIXED = dict(cache_lengths=[0, 9, 6, 8], input_lengths=[7, 1, 5, 1])


def run_both(case, **attrs):
    cached = attention_reference(case.query, case.key, case.value, case.past_key, case.past_value,
                                 case.cache_lengths, case.input_lengths, case.cos, case.sin, **attrs)
    paged = paged_attention_reference(case.query, case.key, case.value, case.key_cache, case.value_cache,
                                      case.page_table, case.slot_mapping, case.cache_lengths, case.input_lengths,
                                      case.cos, case.sin, page_size=case.page_size, **attrs)
    return cached, paged


@pytest.mark.parametrize("shuffle", [False, True], ids=["contiguous", "shuffled"])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("rotary_dim", [None, 8, 4], ids=["no-rotary", "rotary", "partial-rotary"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (2, 2)])
def test_paged_reference_equals_cached_reference(shuffle, window, rotary_dim, heads, kv_heads):
    rng = np.random.default_rng(0)
    case = make_case(rng, **MIXED, heads=heads, kv_heads=kv_heads, rotary_dim=rotary_dim, shuffle=shuffle)
    attrs = dict(num_heads=heads, kv_num_heads=kv_heads, sliding_window=window)
    (out, present_key, present_value), (paged_out, key_out, value_out) = run_both(case, **attrs)
    np.testing.assert_array_equal(paged_out, out)
    for b, (c, n) in enumerate(zip(case.cache_lengths, case.input_lengths)):
        total = c + n
        # the row's whole context, read through its page table, is the contiguous cache's
        np.testing.assert_array_equal(key_out[case.rows[b, :total]], present_key[b, :, :total].transpose(1, 0, 2))
        np.testing.assert_array_equal(value_out[case.rows[b, :total]],
                                      present_value[b, :, :total].transpose(1, 0, 2))
    written = np.zeros(len(key_out), bool)
    for b, n in enumerate(case.input_lengths):
        written[case.slot_mapping[b, :n]] = True
    np.testing.assert_array_equal(key_out[~written], case.key_cache[~written])  # nothing else changed (NaN == NaN)
    np.testing.assert_array_equal(value_out[~written], case.value_cache[~written])


def test_shuffled_pages_give_the_contiguous_result():
    """The same sequences in two different page layouts attend identically."""
    contiguous = make_case(np.random.default_rng(1), **MIXED, rotary_dim=8, shuffle=False)
    shuffled = make_case(np.random.default_rng(1), **MIXED, rotary_dim=8, shuffle=False)
    # move every row's pages to other page ids (a permutation of the used pages), keeping the contents
    rng = np.random.default_rng(7)
    used = sorted({int(p) for p in contiguous.page_table.ravel() if p})
    mapping = dict(zip(used, rng.permutation(used).tolist()))
    ps = contiguous.page_size
    for cache_name in ("key_cache", "value_cache"):
        src, dst = getattr(contiguous, cache_name), getattr(shuffled, cache_name)
        for old, new in mapping.items():
            dst[new * ps:(new + 1) * ps] = src[old * ps:(old + 1) * ps]
    shuffled.page_table = np.vectorize(lambda p: mapping.get(int(p), 0))(contiguous.page_table).astype(np.int32)
    remap = {old * ps + o: new * ps + o for old, new in mapping.items() for o in range(ps)}
    shuffled.slot_mapping = np.vectorize(lambda r: remap.get(int(r), int(r)))(contiguous.slot_mapping).astype(np.int64)
    assert not np.array_equal(shuffled.page_table, contiguous.page_table)
    attrs = dict(num_heads=4, kv_num_heads=2, page_size=ps, sliding_window=0)
    a = paged_attention_reference(contiguous.query, contiguous.key, contiguous.value, contiguous.key_cache,
                                  contiguous.value_cache, contiguous.page_table, contiguous.slot_mapping,
                                  contiguous.cache_lengths, contiguous.input_lengths, contiguous.cos, contiguous.sin,
                                  **attrs)
    b = paged_attention_reference(shuffled.query, shuffled.key, shuffled.value, shuffled.key_cache,
                                  shuffled.value_cache, shuffled.page_table, shuffled.slot_mapping,
                                  shuffled.cache_lengths, shuffled.input_lengths, shuffled.cos, shuffled.sin, **attrs)
    np.testing.assert_array_equal(a[0], b[0])


def test_slot_mapping_must_follow_the_page_table():
    case = make_case(np.random.default_rng(2), **MIXED)
    case.slot_mapping[1, 0] += 1
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_attention_reference(case.query, case.key, case.value, case.key_cache, case.value_cache,
                                  case.page_table, case.slot_mapping, case.cache_lengths, case.input_lengths,
                                  num_heads=4, kv_num_heads=2, page_size=case.page_size)


def paged_model(case, heads: int, kv_heads: int, window: int = 0) -> onnx.ModelProto:
    """A graph of one ``ember.PagedAttention`` node over graph inputs (cos/sin as constants)."""
    f, i32, i64 = ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.INT64
    head_dim = case.key_cache.shape[2]
    with Graph("paged") as g:
        q = g.add_input("query", f, ["batch", "sequence", heads * head_dim])
        k = g.add_input("key", f, ["batch", "sequence", kv_heads * head_dim])
        v = g.add_input("value", f, ["batch", "sequence", kv_heads * head_dim])
        key_cache = g.add_input("key_cache.0", f, ["pool_rows", kv_heads, head_dim])
        value_cache = g.add_input("value_cache.0", f, ["pool_rows", kv_heads, head_dim])
        page_table = g.add_input("page_table", i32, ["batch", "pages"])
        slot_mapping = g.add_input("slot_mapping", i64, ["batch", "sequence"])
        cache_lengths = g.add_input("cache_lengths", i32, ["batch"])
        input_lengths = g.add_input("input_lengths", i32, ["batch"])
        cos = sin = None
        if case.cos is not None:
            cos, sin = g.add_constant(case.cos, "rotary.cos_cache"), g.add_constant(case.sin, "rotary.sin_cache")
        out, key_out, value_out = paged_attention(q, k, v, key_cache, value_cache, page_table, slot_mapping,
                                                  cache_lengths, input_lengths, cos, sin, num_heads=heads,
                                                  kv_num_heads=kv_heads, page_size=case.page_size,
                                                  sliding_window=window)
        g.add_output(out, "output")
        g.add_output(key_out, "key_cache_out.0")
        g.add_output(value_out, "value_cache_out.0")
        return ir.to_proto(g.to_model())


def feeds(case) -> dict[str, np.ndarray]:
    return {"query": case.query, "key": case.key, "value": case.value, "key_cache.0": case.key_cache,
            "value_cache.0": case.value_cache, "page_table": case.page_table, "slot_mapping": case.slot_mapping,
            "cache_lengths": case.cache_lengths, "input_lengths": case.input_lengths}


def test_schema_and_reference_evaluator():
    assert onnx.defs.has("PagedAttention", EMBER_DOMAIN)
    case = make_case(np.random.default_rng(3), **MIXED, rotary_dim=8)
    model = paged_model(case, 4, 2, window=3)
    onnx.checker.check_model(model, full_check=True)
    got = ReferenceEvaluator(model, new_ops=reference_evaluator_ops()).run(None, feeds(case))
    expected = paged_attention_reference(case.query, case.key, case.value, case.key_cache, case.value_cache,
                                         case.page_table, case.slot_mapping, case.cache_lengths, case.input_lengths,
                                         case.cos, case.sin, num_heads=4, kv_num_heads=2, page_size=case.page_size,
                                         sliding_window=3)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
