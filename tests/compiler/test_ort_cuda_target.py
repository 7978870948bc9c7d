"""The ``ort-cuda`` target's lowerings, checked without a GPU.

- the target: registered, its runtime block (backend ``onnxruntime-cuda``, device kind ``cuda``, CUDA then CPU
  providers), its encodings and strategies;
- forms per encoding: float32 gets the explicit attention (the CUDA GroupQueryAttention / PagedAttention take half
  types only, recorded per node); float16 / bfloat16 / q4_0 get GroupQueryAttention (packed q|k|v) and
  ``com.microsoft.PagedAttention``; a head_dim GroupQueryAttention rejects (20) falls back to the explicit form;
  q4_0's MatMulNBits take float16 A and scales;
- ``com.microsoft.PagedAttention`` (no CPU kernel in onnxruntime 1.32): its numpy reference stands in for the node
  in ``onnx.reference``: one op (mixed prefill / decode / cached-prefix rows, shuffled pages, rotary in the kernel
  and before it, packed and separate q|k|v) and a whole tiny Llama lowered PAGED, against ember's own
  ``ember.PagedAttention`` reference on the same inputs.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator
from transformers import LlamaConfig, LlamaForCausalLM

from ember.compiler.passes.lower_attention_gqa import GQA_FORM
from ember.compiler.passes.lower_cached_attention_explicit import FORM as EXPLICIT_FORM
from ember.compiler.passes.lower_paged_attention_contrib import (EXTERNAL_ROTARY_FORM, FORM as CONTRIB_FORM,
                                                                 lower_paged_attention_contrib,
                                                                 paged_attention_contrib_rejection)
from ember.compiler.passes.lowering_record import summarize
from ember.compiler.passes.paged_attention_contrib_reference import PagedAttentionOp
from ember.compiler.targets import TARGETS, get_target
from ember.compiler.targets.ort_cuda import HALF_ONLY
from ember.graphs.architectures.llama import SPEC
from ember.graphs.ir.custom import paged_attention_reference, reference_evaluator_ops
from ember.graphs.nn import KVCacheStrategy
from ember.graphs.options import GraphOptions
from ember.graphs.weights import SafetensorsWeights
from ember.runtime.pipelines import ModelSource

from ..graphs.paged_cases import make_case
from ..graphs.test_paged_attention_op import MIXED, feeds, paged_model
from ..reference.tiny_models import COMMON, make_model, save_random_model

PAGE = 16


def test_target_is_registered_with_its_runtime():
    target = get_target("ort-cuda")
    assert TARGETS["ort-cuda"] is target
    assert target.runtime_block() == {"backend": "onnxruntime-cuda", "device_kind": "cuda",
                                      "settings": {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}}
    assert target.encodings == ("float32", "float16", "bfloat16", "q4_0")
    assert set(target.kv_strategies) == {KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED}


def _checkpoint(directory, head_dim: int):
    if head_dim == 32:
        return make_model("llama-gqa-llama3", directory)
    config = LlamaConfig(**{**COMMON, "hidden_size": 60, "num_attention_heads": 3}, num_key_value_heads=1,
                         head_dim=head_dim, tie_word_embeddings=False)
    return save_random_model(config, LlamaForCausalLM, directory, seed=3)


@pytest.fixture(scope="module", params=[32, 20], ids=["hd32", "hd20"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"hd{request.param}")
    _checkpoint(directory, request.param)
    return request.param, directory


def high_level(directory, strategy=KVCacheStrategy.CONTINUOUS) -> ir.Model:
    source = ModelSource.resolve(directory)
    return SPEC.build(source.hf_config(), SafetensorsWeights(directory), "safetensors",
                      GraphOptions(kv_cache_strategy=strategy, kv_cache_page_size=PAGE))


def ops(model: ir.Model) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type) for n in model.graph}


@pytest.mark.parametrize("strategy", [KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED], ids=["continuous", "paged"])
def test_float32_lowers_attention_to_standard_ops(checkpoint, strategy):
    _, directory = checkpoint
    lowered = get_target("ort-cuda").lower(high_level(directory, strategy), "float32")
    assert not {op for op in ops(lowered) if op[0] == "com.microsoft"} - {
        ("com.microsoft", "SkipSimplifiedLayerNormalization")}
    records = summarize(lowered)
    assert len(records) == 3 and all(any(HALF_ONLY in r for r in rec.rejected) for rec in records)
    onnx.checker.check_model(ir.to_proto(lowered))


@pytest.mark.parametrize("encoding", ["float16", "bfloat16", "q4_0"])
def test_half_encodings_lower_to_the_fused_kernels(checkpoint, encoding):
    head_dim, directory = checkpoint
    lowered = get_target("ort-cuda").lower(high_level(directory), encoding)
    half = ir.DataType.BFLOAT16 if encoding == "bfloat16" else ir.DataType.FLOAT16
    forms = {rec.form for rec in summarize(lowered)}
    if head_dim == 32:
        assert forms == {GQA_FORM}
        gqa = [n for n in lowered.graph if n.op_type == "GroupQueryAttention"]
        assert len(gqa) == 3 and all(n.inputs[1] is None for n in gqa)  # packed q|k|v
    else:  # head_dim 20: the helper's "multiple of 8" rejects it; explicit attention, Softmax in float32
        assert forms == {EXPLICIT_FORM}
        assert all("multiple of 8" in r for rec in summarize(lowered) for r in rec.rejected)
    assert {v.dtype for v in lowered.graph.inputs if v.name.startswith("past_")} == {half}
    assert [v.dtype for v in lowered.graph.outputs if v.name == "logits"] == [ir.DataType.FLOAT]
    if encoding == "q4_0":
        nbits = [n for n in lowered.graph if n.op_type == "MatMulNBits"]
        assert nbits and all(n.inputs[2].dtype == ir.DataType.FLOAT16 for n in nbits)
        assert not any(n.op_type in ("MatMul", "Gemm") and n.inputs[1].const_value is not None for n in lowered.graph)
    proto = ir.to_proto(lowered)
    onnx.checker.check_model(proto)
    if encoding != "bfloat16":  # onnxruntime's CPU provider has no bfloat16 MatMul; float16 it runs (cast inside)
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


# com.microsoft.PagedAttention ---------------------------------------------------------------------------------
def _reshape_feeds(case, names=("key_cache.0", "value_cache.0")) -> dict:
    f = feeds(case)
    for name in names:
        f[name] = f[name].reshape(-1, case.page_size, *f[name].shape[1:])
    return f


@pytest.mark.parametrize("head_dim,rotary_dim,form", [(16, 16, CONTRIB_FORM), (8, 8, EXTERNAL_ROTARY_FORM),
                                                      (16, None, CONTRIB_FORM)],
                         ids=["rotary-in-kernel", "rotary-before", "no-rotary"])
def test_contrib_lowering_of_one_op_matches_the_reference(head_dim, rotary_dim, form):
    heads, kv_heads = 4, 2
    case = make_case(np.random.default_rng(0), cache_lengths=[0, 19, 16, 33], input_lengths=[21, 1, 5, 1],
                     heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_size=PAGE, rotary_dim=rotary_dim)
    model = lower_paged_attention_contrib(ir.from_proto(paged_model(case, heads, kv_heads)))
    assert [rec.form for rec in summarize(model)] == [form]
    node = next(n for n in model.graph if n.op_type == "PagedAttention")
    assert node.domain == "com.microsoft" and int(node.attributes["do_rotary"].value) == (form == CONTRIB_FORM
                                                                                         and rotary_dim is not None)
    assert [list(v.shape) for v in model.graph.inputs if "_cache." in v.name] == [["num_pages", PAGE, kv_heads, head_dim]] * 2
    out, key_out, value_out = ReferenceEvaluator(ir.to_proto(model), new_ops=[PagedAttentionOp]).run(
        None, _reshape_feeds(case))
    ref_out, ref_key, ref_value = paged_attention_reference(
        case.query, case.key, case.value, case.key_cache, case.value_cache, case.page_table, case.slot_mapping,
        case.cache_lengths, case.input_lengths, case.cos, case.sin, num_heads=heads, kv_num_heads=kv_heads,
        page_size=PAGE)
    for b, n in enumerate(case.input_lengths):
        np.testing.assert_allclose(out[b, :n], ref_out[b, :n], rtol=1e-5, atol=1e-5)
    # the real tokens' K/V only: no padding write lands anywhere (page 0 stays as it was too)
    np.testing.assert_array_equal(key_out.reshape(ref_key.shape), ref_key)
    np.testing.assert_array_equal(value_out.reshape(ref_value.shape), ref_value)


def test_contrib_rejections():
    case = make_case(np.random.default_rng(0), **MIXED, head_dim=12, page_size=4)
    node = next(iter(ir.from_proto(paged_model(case, 4, 2)).graph))
    assert "multiple of 8" in paged_attention_contrib_rejection(node)
    case = make_case(np.random.default_rng(0), **MIXED, head_dim=16, page_size=4)
    node = next(iter(ir.from_proto(paged_model(case, 4, 2)).graph))
    assert "power of two >= 16" in paged_attention_contrib_rejection(node)
    case = make_case(np.random.default_rng(0), **MIXED, head_dim=16, page_size=16)
    node = next(iter(ir.from_proto(paged_model(case, 4, 2, window=3)).graph))
    assert "sliding" in paged_attention_contrib_rejection(node)


def test_paged_llama_lowered_to_the_contrib_op_matches_the_reference(tmp_path):
    """A tiny Llama (3 layers, packed q|k|v): prefill rows of different lengths, then a batch mixing a decode row,
    a fresh prompt and a row extending its cache by 5 tokens, pages shuffled; the lowered graph (contrib node run by
    its reference) equals the high-level graph run by ember's references, logits and pools."""
    make_model("llama-gqa-llama3", tmp_path)
    high = ir.to_proto(high_level(tmp_path, KVCacheStrategy.PAGED))
    model = ir.from_proto(high)
    for compiler_pass in get_target("ort-cuda").passes[1:]:  # the q|k|v fusion (onnx.reference has no Skip*Norm)
        model = compiler_pass(model)
    model = lower_paged_attention_contrib(model)
    assert {rec.form for rec in summarize(model)} == {CONTRIB_FORM}
    assert all(n.inputs[1] is None for n in model.graph if n.op_type == "PagedAttention")  # packed q|k|v
    lowered = ir.to_proto(model)
    reference = ReferenceEvaluator(high, new_ops=reference_evaluator_ops())
    contrib = ReferenceEvaluator(lowered, new_ops=[PagedAttentionOp])
    rng = np.random.default_rng(1)
    num_pages, layers, kv, hd = 12, 3, 2, 32
    pool = {f"{w}_cache.{i}": rng.standard_normal((num_pages * PAGE, kv, hd)).astype(np.float32)
            for i in range(layers) for w in ("key", "value")}
    pages = [int(p) for p in rng.permutation(np.arange(1, num_pages))]
    tables: list[list[int]] = [[], [], []]
    lengths = [0, 0, 0]

    def step(rows: list[int], tokens: list[list[int]]) -> None:
        batch, seq = len(rows), max(len(t) for t in tokens)
        for r, t in zip(rows, tokens):
            while len(tables[r]) * PAGE < lengths[r] + len(t):
                tables[r].append(pages.pop())
        width = max(len(tables[r]) for r in rows) + 1
        page_table = np.zeros((batch, width), np.int32)
        slot_mapping = np.tile(np.arange(seq, dtype=np.int64) % PAGE, (batch, 1))  # padding: scratch page 0
        ids = np.zeros((batch, seq), np.int64)
        for b, (r, t) in enumerate(zip(rows, tokens)):
            page_table[b, :len(tables[r])] = tables[r]
            positions = lengths[r] + np.arange(len(t))
            slot_mapping[b, :len(t)] = page_table[b, positions // PAGE].astype(np.int64) * PAGE + positions % PAGE
            ids[b, :len(t)] = t
        f = {"input_ids": ids, "input_lengths": np.array([len(t) for t in tokens], np.int32),
             "cache_lengths": np.array([lengths[r] for r in rows], np.int32), "page_table": page_table,
             "slot_mapping": slot_mapping, **pool}
        expected = reference.run(None, f)
        got = contrib.run(None, {**f, **{k: v.reshape(num_pages, PAGE, kv, hd) for k, v in pool.items()}})
        scale = np.abs(expected[0]).max()
        np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-5 * scale)
        names = [o.name for o in high.graph.output][1:]
        for name, new in zip(names, got[1:]):
            pool[name.replace("_out", "")] = new.reshape(-1, kv, hd)
        for name, new in zip(names, expected[1:]):  # the real tokens' rows agree (the reference skips padding)
            written = np.concatenate([slot_mapping[b, :len(t)] for b, t in enumerate(tokens)])
            np.testing.assert_allclose(pool[name.replace("_out", "")][written], new[written], rtol=1e-5, atol=1e-6)
        for r, t in zip(rows, tokens):
            lengths[r] += len(t)

    step([0, 1], [list(rng.integers(4, 150, 21)), list(rng.integers(4, 150, 7))])
    step([0, 1, 2], [[5], list(rng.integers(4, 150, 5)), list(rng.integers(4, 150, 18))])
