"""Attention lowerings on head sizes GroupQueryAttention rejects: the check agrees with the kernel, and every shape
lowers to something onnxruntime runs and that equals the numpy reference.

- ``gqa_rejection`` against the installed onnxruntime: where it rejects the in-kernel rotary form, that form
  really fails in onnxruntime (forced past the check); where it accepts, the lowered node runs.
- ``ember.CachedAttention`` over a grid of head sizes (8 ... 256, multiples of 16, of 8 only, of 4 only), rotary
  full / partial / none, MHA / GQA / MQA and a sliding window, in GroupQueryAttention's three batch modes
  (right-padded first prompts, decodes at different cache lengths, one row extending its cache) and, for the
  explicit form, a mixed batch: onnxruntime's outputs and written caches equal ``attention_reference``; the form
  chosen and the reasons are recorded per node.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ember.compiler.passes.lower_attention_gqa import (EXTERNAL_ROTARY_FORM, GQA_FORM, gqa_rejection,
                                                        lower_attention_to_gqa)
from ember.compiler.passes.lower_cached_attention_explicit import FORM as EXPLICIT_FORM
from ember.compiler.passes.lower_cached_attention_explicit import lower_cached_attention_explicit
from ember.compiler.passes.lowering_record import refuse_unlowered, summarize
from ember.graphs.ir.custom.attention import attention_reference
from ember.graphs.ir.versions import EMBER_DOMAIN, IR_VERSION, MS_DOMAIN, ONNX_OPSET

from ..graphs.paged_cases import rotary_tables

MAX_LEN, POSITIONS = 24, 32
MODES = {  # (cache_lengths, input_lengths)
    "prefill": ([0, 0, 0], [7, 3, 5]),
    "decode": ([9, 2, 15], [1, 1, 1]),
    "extend": ([6], [5]),
    "mixed": ([0, 9, 6], [7, 1, 5]),  # explicit form only (GroupQueryAttention cannot run it)
}


def attention_model(batch, seq, heads, kv_heads, head_dim, rotary_dim, window, gqa_in_kernel=False):
    """One ``ember.CachedAttention`` (or, with ``gqa_in_kernel``, the GroupQueryAttention with rotary inside it
    that the lowering would emit without its check)."""
    f = TensorProto.FLOAT
    cache = [batch, kv_heads, MAX_LEN, head_dim]
    inputs = [helper.make_tensor_value_info("query", f, [batch, seq, heads * head_dim]),
              helper.make_tensor_value_info("key", f, [batch, seq, kv_heads * head_dim]),
              helper.make_tensor_value_info("value", f, [batch, seq, kv_heads * head_dim]),
              helper.make_tensor_value_info("past_key", f, cache), helper.make_tensor_value_info("past_value", f, cache),
              helper.make_tensor_value_info("cache_lengths", TensorProto.INT32, [batch]),
              helper.make_tensor_value_info("input_lengths", TensorProto.INT32, [batch])]
    if rotary_dim:
        inputs += [helper.make_tensor_value_info(n, f, [POSITIONS, rotary_dim // 2]) for n in ("cos", "sin")]
    outputs = [helper.make_tensor_value_info("output", f, [batch, seq, heads * head_dim]),
               helper.make_tensor_value_info("present_key", f, cache),
               helper.make_tensor_value_info("present_value", f, cache)]
    names = [i.name for i in inputs]
    if gqa_in_kernel:
        nodes = [helper.make_node("Add", ["cache_lengths", "input_lengths"], ["total"]),
                 helper.make_node("Sub", ["total", "one"], ["seqlens_k"]),
                 helper.make_node("ReduceMax", ["total"], ["total_len"], keepdims=0),
                 helper.make_node("GroupQueryAttention", names[:5] + ["seqlens_k", "total_len"] + names[7:],
                                  ["output", "present_key", "present_value"], domain=MS_DOMAIN, num_heads=heads,
                                  kv_num_heads=kv_heads, do_rotary=int(bool(rotary_dim)),
                                  local_window_size=window or -1)]
        initializers = [helper.make_tensor("one", TensorProto.INT32, [], [1])]
    else:
        nodes = [helper.make_node("CachedAttention", names, ["output", "present_key", "present_value"],
                                  name="/model/layers.0/self_attn/CachedAttention", domain=EMBER_DOMAIN,
                                  num_heads=heads, kv_num_heads=kv_heads, sliding_window=window)]
        initializers = []
    graph = helper.make_graph(nodes, "attention", inputs, outputs, initializer=initializers)
    opsets = [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(EMBER_DOMAIN, 1),
              helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def random_feeds(rng, mode, heads, kv_heads, head_dim, rotary_dim):
    cache_lengths, input_lengths = (np.array(x, np.int32) for x in MODES[mode])
    batch, seq = len(cache_lengths), int(input_lengths.max())
    feeds = {"query": rng.standard_normal((batch, seq, heads * head_dim)).astype(np.float32),
             "key": rng.standard_normal((batch, seq, kv_heads * head_dim)).astype(np.float32),
             "value": rng.standard_normal((batch, seq, kv_heads * head_dim)).astype(np.float32),
             "past_key": rng.standard_normal((batch, kv_heads, MAX_LEN, head_dim)).astype(np.float32),
             "past_value": rng.standard_normal((batch, kv_heads, MAX_LEN, head_dim)).astype(np.float32),
             "cache_lengths": cache_lengths, "input_lengths": input_lengths}
    if rotary_dim:
        feeds["cos"], feeds["sin"] = rotary_tables(POSITIONS, rotary_dim)
    return feeds


def lower(model: onnx.ModelProto) -> ir.Model:
    lowered = lower_cached_attention_explicit(lower_attention_to_gqa(ir.from_proto(model)))
    refuse_unlowered(lowered, "ort-cpu")
    return lowered


def run(model: onnx.ModelProto | ir.Model, feeds) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def check_against_reference(got, feeds, heads, kv_heads, window):
    ref = attention_reference(*(feeds[n] for n in ("query", "key", "value", "past_key", "past_value",
                                                   "cache_lengths", "input_lengths")),
                              feeds.get("cos"), feeds.get("sin"), num_heads=heads, kv_num_heads=kv_heads,
                              sliding_window=window)
    for b, (c, n) in enumerate(zip(feeds["cache_lengths"], feeds["input_lengths"])):
        np.testing.assert_allclose(got[0][b, :n], ref[0][b, :n], rtol=1e-5, atol=2e-5)
        for i in (1, 2):  # the row's cache up to its new total length
            np.testing.assert_allclose(got[i][b, :, :c + n], ref[i][b, :, :c + n], rtol=1e-5, atol=1e-5)


HEAD_DIMS = [8, 12, 20, 24, 40, 64, 72, 80, 96, 128, 256]


def rotary_dims(head_dim: int) -> list[int | None]:
    dims = [head_dim, None]
    if head_dim % 4 == 0:
        dims.append(head_dim // 2)  # partial rotary (half the head)
    return dims


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_rejection_agrees_with_the_kernel(head_dim):
    """Where the check rejects rotary in the kernel, onnxruntime refuses it too; where it accepts, it runs."""
    rng = np.random.default_rng(head_dim)
    for rotary_dim in rotary_dims(head_dim):
        model = attention_model(3, 7, 4, 2, head_dim, rotary_dim, 0)
        node = next(iter(ir.from_proto(model).graph))
        reason = gqa_rejection(node)
        forced = attention_model(3, 7, 4, 2, head_dim, rotary_dim, 0, gqa_in_kernel=True)
        feeds = random_feeds(rng, "prefill", 4, 2, head_dim, rotary_dim)
        if reason is None:
            check_against_reference(run(forced, feeds), feeds, 4, 2, 0)
        else:
            with pytest.raises(Exception, match="head_size|cos_cache|sin_cache"):
                run(forced, feeds)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_head_size_lowers_and_matches_the_reference(head_dim, mode):
    rng = np.random.default_rng(head_dim * 7 + len(mode))
    shapes = [(4, 2, 0), (4, 1, 3), (3, 3, 0)]  # (heads, kv heads, window): GQA, MQA with a window, MHA
    for (heads, kv_heads, window), rotary_dim in zip(shapes * 2, rotary_dims(head_dim) * 2):
        cache_lengths, input_lengths = MODES[mode]
        model = attention_model(len(cache_lengths), max(input_lengths), heads, kv_heads, head_dim, rotary_dim,
                                window)
        node = next(iter(ir.from_proto(model).graph))
        in_kernel, without = gqa_rejection(node), gqa_rejection(node, rotary_in_kernel=False)
        lowered = lower(model)
        (record,) = summarize(lowered)
        expected = (GQA_FORM if in_kernel is None else EXTERNAL_ROTARY_FORM if without is None and rotary_dim
                    else EXPLICIT_FORM)
        assert record.form == expected, record
        assert bool(record.rejected) == (expected != GQA_FORM)
        if mode == "mixed" and expected != EXPLICIT_FORM:
            continue  # GroupQueryAttention's modes exclude mixed batches (the runtime never forms them for it)
        feeds = random_feeds(rng, mode, heads, kv_heads, head_dim, rotary_dim)
        check_against_reference(run(lowered, feeds), feeds, heads, kv_heads, window)


def test_rejected_node_names_the_limit():
    model = attention_model(3, 7, 4, 2, 12, 12, 0)
    (record,) = summarize(lower(model))
    assert record.form == EXPLICIT_FORM
    assert "head_dim must be a multiple of 8, not 12" in " ".join(record.rejected)
    (record,) = summarize(lower(attention_model(3, 7, 4, 2, 40, 40, 0)))
    assert record.form == EXTERNAL_ROTARY_FORM
    assert "multiple of 16, not 40" in record.rejected[0]


def test_unlowered_op_is_refused_at_compile_time():
    model = ir.from_proto(attention_model(3, 7, 4, 2, 12, 12, 0))
    lower_attention_to_gqa(model)  # GroupQueryAttention rejects it and nothing else is tried
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8, not 12"):
        refuse_unlowered(model, "ort-cpu")
