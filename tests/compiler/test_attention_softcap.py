"""The attention ops' ``scale`` and ``softcap`` attributes (Gemma 2): the numpy reference means
``softcap * tanh(q.k * scale / softcap)`` before the mask, and every lowering keeps that meaning.

- reference: against a direct per-row computation; the paged reference equals the contiguous one; the reference
  evaluator passes the attributes through;
- ``ember.CachedAttention`` -> GroupQueryAttention (rotary in the kernel at head_dim 16, a ``RotaryEmbedding``
  before it at 40) and -> the explicit ScatterND fallback (head_dim 12, and 16 forced), in the kernel's three batch
  modes (and a mixed batch for the explicit form), with and without a window; the int8 KV cache form too;
- ``ember.PagedAttention`` -> ScatterND + Gather + explicit attention, on a mixed batch of shuffled pages.

GroupQueryAttention needs no rejection for either attribute: onnxruntime's CPU kernel applies both (checked here,
so that an onnxruntime which stops doing so fails this file rather than a model's logits).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

from ember.compiler.passes.lower_attention_gqa import GQA_FORM, lower_attention_to_gqa, quantize_kv_cache
from ember.compiler.passes.lower_cached_attention_explicit import FORM as EXPLICIT_FORM
from ember.compiler.passes.lower_cached_attention_explicit import lower_cached_attention_explicit
from ember.compiler.passes.lower_paged_attention import lower_paged_attention
from ember.compiler.passes.lowering_record import summarize
from ember.graphs.ir.custom import attention_reference, paged_attention_reference, reference_evaluator_ops

from ..graphs.paged_cases import make_case
from ..graphs.test_paged_attention_op import MIXED, paged_model
from ..graphs.test_paged_attention_op import feeds as paged_feeds
from .test_attention_limits import MODES, attention_model, lower, random_feeds, run

SCALE, SOFTCAP = 0.3, 2.0  # a cap small enough that tanh bends the scores of unit-variance q and k


def with_attributes(model: onnx.ModelProto, **attributes: float) -> ir.Model:
    """``model`` (one ember attention node) with ``attributes`` set on that node."""
    lowered = ir.from_proto(model)
    node = next(iter(lowered.graph))
    for name, value in attributes.items():
        node.attributes[name] = ir.AttrFloat32(name, value)
    return lowered


def reference_of(feeds, heads, kv_heads, window, **attributes):
    return attention_reference(*(feeds[n] for n in ("query", "key", "value", "past_key", "past_value",
                                                    "cache_lengths", "input_lengths")),
                               feeds.get("cos"), feeds.get("sin"), num_heads=heads, kv_num_heads=kv_heads,
                               sliding_window=window, **attributes)


def assert_rows_match(got, expected, cache_lengths, input_lengths):
    for b, (c, n) in enumerate(zip(cache_lengths, input_lengths)):
        np.testing.assert_allclose(got[0][b, :n], expected[0][b, :n], rtol=1e-5, atol=2e-5)
        for i in (1, 2):
            np.testing.assert_allclose(got[i][b, :, :c + n], expected[i][b, :, :c + n], rtol=1e-5, atol=1e-5)


# reference ----------------------------------------------------------------------------------------------------
def test_reference_caps_the_scaled_scores():
    rng = np.random.default_rng(0)
    feeds = random_feeds(rng, "extend", 4, 2, 8, None)
    out, _, present_value = reference_of(feeds, 4, 2, 0, scale=SCALE, softcap=SOFTCAP)
    q = feeds["query"][0, :5].reshape(5, 4, 8)
    keys, values = reference_of(feeds, 4, 2, 0)[1][0, :, :11], present_value[0, :, :11]  # [kv, 11, hd]
    for h in range(4):
        scores = q[:, h] @ keys[h // 2].T * SCALE
        scores = SOFTCAP * np.tanh(scores / SOFTCAP)
        scores[np.arange(11)[None, :] > 6 + np.arange(5)[:, None]] = -np.inf
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[0, :5, h * 8:(h + 1) * 8], probs @ values[h // 2], rtol=1e-5, atol=1e-6)
    uncapped = reference_of(feeds, 4, 2, 0, scale=SCALE)[0]
    assert np.abs(uncapped - out).max() > 0.1  # the cap changes the result: the test above is not vacuous


def test_paged_reference_and_reference_evaluator_carry_the_attributes():
    case = make_case(np.random.default_rng(1), **MIXED, rotary_dim=8)
    attrs = dict(num_heads=4, kv_num_heads=2, sliding_window=3, scale=SCALE, softcap=SOFTCAP)
    contiguous = attention_reference(case.query, case.key, case.value, case.past_key, case.past_value,
                                     case.cache_lengths, case.input_lengths, case.cos, case.sin, **attrs)
    paged = paged_attention_reference(case.query, case.key, case.value, case.key_cache, case.value_cache,
                                      case.page_table, case.slot_mapping, case.cache_lengths, case.input_lengths,
                                      case.cos, case.sin, page_size=case.page_size, **attrs)
    np.testing.assert_array_equal(paged[0], contiguous[0])
    model = ir.to_proto(with_attributes(paged_model(case, 4, 2, window=3), scale=SCALE, softcap=SOFTCAP))
    onnx.checker.check_model(model, full_check=True)
    got = ReferenceEvaluator(model, new_ops=reference_evaluator_ops()).run(None, paged_feeds(case))
    np.testing.assert_array_equal(got[0], paged[0])


# CachedAttention lowerings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("head_dim", [16, 40, 12])
def test_cached_attention_lowerings_apply_scale_and_softcap(head_dim, mode, window):
    """GroupQueryAttention where it takes the node (16, 40), the explicit fallback where it does not (12)."""
    rng = np.random.default_rng(head_dim + len(mode) + window)
    cache_lengths, input_lengths = MODES[mode]
    model = attention_model(len(cache_lengths), max(input_lengths), 4, 2, head_dim, head_dim, window)
    lowered = lower(ir.to_proto(with_attributes(model, scale=SCALE, softcap=SOFTCAP)))
    (record,) = summarize(lowered)
    if record.form != EXPLICIT_FORM:
        if mode == "mixed":
            return  # outside GroupQueryAttention's modes (the runtime never forms such a batch for it)
        (gqa,) = [n for n in lowered.graph if n.op_type == "GroupQueryAttention"]
        assert gqa.attributes["softcap"].value == pytest.approx(SOFTCAP)
        assert gqa.attributes["scale"].value == pytest.approx(SCALE)
    assert (record.form == GQA_FORM) == (head_dim == 16)
    feeds = random_feeds(rng, mode, 4, 2, head_dim, head_dim)
    assert_rows_match(run(lowered, feeds), reference_of(feeds, 4, 2, window, scale=SCALE, softcap=SOFTCAP),
                      cache_lengths, input_lengths)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_explicit_fallback_applies_scale_and_softcap_at_any_head_size(mode):
    """The fallback forced on a head size GroupQueryAttention would take."""
    rng = np.random.default_rng(5)
    cache_lengths, input_lengths = MODES[mode]
    model = attention_model(len(cache_lengths), max(input_lengths), 4, 1, 16, 8, 3)
    lowered = lower_cached_attention_explicit(with_attributes(model, scale=SCALE, softcap=SOFTCAP))
    assert any(n.op_type == "Tanh" for n in lowered.graph)
    feeds = random_feeds(rng, mode, 4, 1, 16, 8)
    assert_rows_match(run(lowered, feeds), reference_of(feeds, 4, 1, 3, scale=SCALE, softcap=SOFTCAP),
                      cache_lengths, input_lengths)


def test_int8_kv_cache_applies_softcap():
    """GroupQueryAttention's int8 cache mode caps too: with values the int8 grid holds exactly, it equals the
    float reference."""
    rng = np.random.default_rng(6)
    step = 0.05
    cache_lengths, input_lengths = MODES["decode"]
    model = with_attributes(attention_model(3, 1, 4, 2, 16, None, 0), scale=SCALE, softcap=SOFTCAP)
    scales = {name: np.full((2, 16), step, np.float32) for name in ("past_key", "past_value")}
    lowered = quantize_kv_cache(lower_attention_to_gqa(model), 8, scales)
    feeds = random_feeds(rng, "decode", 4, 2, 16, None)
    for name in ("key", "value", "past_key", "past_value"):
        feeds[name] = np.clip(np.round(feeds[name] * 20), -127, 127).astype(np.float32) * step
    expected = reference_of(feeds, 4, 2, 0, scale=SCALE, softcap=SOFTCAP)
    for name in ("past_key", "past_value"):
        feeds[name] = np.round(feeds[name] / step).astype(np.int8)
    out = run(lowered, feeds)[0]
    np.testing.assert_allclose(out[:, 0], expected[0][:, 0], rtol=1e-5, atol=2e-5)
    assert len(cache_lengths) == len(input_lengths) == 3


# PagedAttention lowering ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("head_dim", [8, 12])
def test_paged_lowering_applies_scale_and_softcap(head_dim, window):
    case = make_case(np.random.default_rng(head_dim), **MIXED, head_dim=head_dim, rotary_dim=head_dim)
    model = with_attributes(paged_model(case, 4, 2, window), scale=SCALE, softcap=SOFTCAP)
    out = run(lower_paged_attention(model), paged_feeds(case))[0]
    expected = paged_attention_reference(
        case.query, case.key, case.value, case.key_cache, case.value_cache, case.page_table, case.slot_mapping,
        case.cache_lengths, case.input_lengths, case.cos, case.sin, num_heads=4, kv_num_heads=2,
        page_size=case.page_size, sliding_window=window, scale=SCALE, softcap=SOFTCAP)[0]
    for b, n in enumerate(case.input_lengths):
        np.testing.assert_allclose(out[b, :n], expected[b, :n], rtol=1e-5, atol=2e-5)
