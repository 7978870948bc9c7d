"""The ort-cpu lowering of ``ember.PagedAttention`` through GroupQueryAttention (``lower_paged_attention_gqa``).

- one op, every kind of step the scheduler forms (decode rows at different cache lengths, a right-padded first
  prompt, one row's chunk after a cached prefix, a mixed step, unpadded rows with pasts, a decode step with an
  empty row): the graph's branch condition says which attention runs (the kernel only where its modes are right)
  and the output equals the numpy reference either way, with GQA, MQA and MHA heads, a window, partial rotary;
- head sizes the kernel rejects (not a multiple of 8) stay for the explicit paged lowering, the reason recorded;
- tiny Llama checkpoints (head_dim 32 GQA, 64 MQA, 20 rejected) lowered by the ort-cpu target with this pass
  before the explicit paged lowering (a ``dataclasses.replace`` of the target), stepped through
  a prefill of uneven rows, decode steps, a step mixing a decode, a fresh prompt, a chunk and a prefix-cache hit,
  then decode again: every row's logits within 1e-4 relative of transformers'.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from ember.compiler.passes.lower_paged_attention import FORM as EXPLICIT_FORM, lower_paged_attention
from ember.compiler.passes.lower_paged_attention_gqa import FORM, lower_paged_attention_gqa
from ember.compiler.passes.lowering_record import summarize
from ember.compiler.targets.ort_cpu import ORT_CPU
from ember.graphs.architectures.llama import SAFETENSORS_RULES, LlamaArchConfig, build_graph
from ember.graphs.ir.custom import paged_attention_reference
from ember.graphs.nn import KVCacheStrategy
from ember.graphs.options import GraphOptions
from ember.graphs.weights import SafetensorsWeights
from ember.graphs.weights.adapter import AdaptedWeights
from ember.runtime.pipelines import ModelSource

from ..graphs.paged_cases import make_case
from ..graphs.test_paged_attention_op import feeds, paged_model
from ..reference.tiny_models import save_random_model
from .test_paged_lowering import Pages, hf_last_logits, relative_error

#: (cache lengths, input lengths, whether GroupQueryAttention takes the step)
STEPS = {
    "decode": ([5, 9, 0, 13], [1, 1, 1, 1], True),
    "first-prompt-padded": ([0, 0, 0], [7, 3, 7], True),
    "chunk-after-prefix": ([9], [5], True),
    "mixed": ([0, 9, 6, 8], [7, 1, 5, 1], False),
    "unpadded-rows-with-pasts": ([4, 9], [3, 3], False),  # the kernel wants one row when seq > 1 after a past
    "decode-with-empty-row": ([5, 3], [1, 0], False),
}
HEADS = {"gqa-rotary": (4, 2, 0, 8, 8), "mqa-window-partial-rotary": (4, 1, 3, 4, 8), "mha-hd16": (2, 2, 0, None, 16)}


def lowered_with_condition(case, heads: int, kv_heads: int, window: int) -> onnx.ModelProto:
    """The lowered one-node graph, with the If's condition as an extra graph output."""
    model = lower_paged_attention_gqa(ir.from_proto(paged_model(case, heads, kv_heads, window)))
    [branch] = [node for node in model.graph if node.op_type == "If"]
    condition = branch.inputs[0]
    condition.type, condition.shape = ir.TensorType(ir.DataType.BOOL), ir.Shape([])
    model.graph.outputs.append(condition)
    return ir.to_proto(model)


@pytest.mark.parametrize("heads_name", sorted(HEADS))
@pytest.mark.parametrize("step", sorted(STEPS))
def test_each_step_takes_the_right_attention_and_matches_reference(step, heads_name):
    cache_lengths, input_lengths, fits = STEPS[step]
    heads, kv_heads, window, rotary_dim, head_dim = HEADS[heads_name]
    case = make_case(np.random.default_rng(0), cache_lengths=cache_lengths, input_lengths=input_lengths,
                     heads=heads, kv_heads=kv_heads, rotary_dim=rotary_dim, head_dim=head_dim)
    proto = lowered_with_condition(case, heads, kv_heads, window)
    onnx.checker.check_model(proto)
    assert {n.op_type for n in proto.graph.node} >= {"ScatterND", "Gather", "If"}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out, key_out, value_out, took_kernel = session.run(None, feeds(case))
    assert bool(took_kernel) == fits
    ref_out, ref_key, ref_value = paged_attention_reference(
        case.query, case.key, case.value, case.key_cache, case.value_cache, case.page_table, case.slot_mapping,
        case.cache_lengths, case.input_lengths, case.cos, case.sin, num_heads=heads, kv_num_heads=kv_heads,
        page_size=case.page_size, sliding_window=window)
    for b, n in enumerate(case.input_lengths):
        np.testing.assert_allclose(out[b, :n], ref_out[b, :n], rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()
    rows = slice(case.page_size, None)  # page 0 (scratch) takes the padding tokens' writes
    np.testing.assert_allclose(key_out[rows], ref_key[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value_out[rows], ref_value[rows], rtol=1e-5, atol=1e-5)


def test_head_size_the_kernel_rejects_falls_back_to_explicit_attention():
    case = make_case(np.random.default_rng(1), cache_lengths=[3, 0], input_lengths=[1, 1], heads=4, kv_heads=2,
                     head_dim=12, rotary_dim=12)
    model = lower_paged_attention_gqa(ir.from_proto(paged_model(case, 4, 2)))
    assert [node.op_type for node in model.graph if node.domain == "ember"] == ["PagedAttention"]
    model = lower_paged_attention(model)
    [record] = summarize(model)
    assert record.form == EXPLICIT_FORM
    assert record.rejected == (f"{FORM}: head_dim must be a multiple of 8, not 12",)


# tiny models --------------------------------------------------------------------------------------------------
CHECKPOINTS = {"hd32-gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
               "hd64-mqa": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=64),
               "hd20-rejected": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=20)}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_config = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            tie_word_embeddings=False, **CHECKPOINTS[request.param])
    hf_model = save_random_model(hf_config, LlamaForCausalLM, directory)
    config = LlamaArchConfig.from_hf(ModelSource.resolve(directory).hf_config())
    page_size = 4
    high = build_graph(config, AdaptedWeights(SafetensorsWeights(directory), SAFETENSORS_RULES),
                       GraphOptions(kv_cache_strategy=KVCacheStrategy.PAGED, kv_cache_page_size=page_size))
    passes = list(ORT_CPU.passes)
    passes.insert(passes.index(lower_paged_attention), lower_paged_attention_gqa)
    lowered = dataclasses.replace(ORT_CPU, passes=tuple(passes)).lower(high)
    records = summarize(lowered)
    session = ort.InferenceSession(ir.to_proto(lowered).SerializeToString(), providers=["CPUExecutionProvider"])
    return request.param, hf_model, config, page_size, session, records


def test_tiny_model_steps_match_transformers(tiny):
    name, hf_model, config, page_size, session, records = tiny
    expected = EXPLICIT_FORM if config.head_dim % 8 else FORM
    assert [r.form for r in records] == [expected] * config.num_layers
    pool_shape = (40 * page_size, config.num_kv_heads, config.head_dim)
    caches = {f"{kind}_cache.{i}": np.zeros(pool_shape, np.float32)
              for i in range(config.num_layers) for kind in ("key", "value")}
    pages = Pages(40, page_size, seed=2)
    rng = np.random.default_rng(3)

    def tokens(n: int, bos: bool = True) -> list[int]:
        return [1] * bos + rng.integers(4, config.vocab_size, n - bos).tolist()

    def step(batch: list[tuple[str, list[int]]]) -> None:
        logits, *outs = session.run(None, {**pages.batch(batch), **caches})
        for i in range(config.num_layers):
            caches[f"key_cache.{i}"], caches[f"value_cache.{i}"] = outs[2 * i], outs[2 * i + 1]
        errors = [relative_error(logits[b], hf_last_logits(hf_model, pages.tokens[row]))
                  for b, (row, _) in enumerate(batch)]
        assert max(errors) < 1e-4, (name, [(row, len(t)) for row, t in batch], errors)

    for row in ("a", "b", "c"):
        pages.new(row)
    step([("a", tokens(13)), ("b", tokens(5)), ("c", tokens(9))])  # first prompts, right-padded
    for _ in range(3):
        step([(row, tokens(1, bos=False)) for row in ("a", "b", "c")])  # decode
    step([("b", tokens(6, bos=False))])  # one row's chunk after its cached tokens
    pages.new("d")
    pages.new("e", pages.tables["a"][:2], pages.tokens["a"][:2 * page_size])  # prefix-cache hit on a's pages
    step([("a", tokens(1, bos=False)), ("d", tokens(7)), ("c", tokens(4, bos=False)), ("e", tokens(3, bos=False))])
    for _ in range(2):
        step([(row, tokens(1, bos=False)) for row in ("a", "b", "c", "d", "e")])  # decode, the new rows included
