"""The ort-cpu lowering of ``ember.PagedAttention`` (ScatterND + Gather + explicit attention), run by onnxruntime.

- one op: onnxruntime equals the numpy reference for mixed batches (prompt, decode, cached prefix + 5), shuffled
  pages, GQA/MQA/MHA, sliding window, full/partial/interleaved rotary, and never reads pages no row owns;
- a tiny Llama and Mistral built PAGED: prefill of rows of different lengths, decode steps, then one batch
  mixing a decode row, a fresh prompt, a row extending its cache by 5 tokens and a prompt that reuses another
  sequence's full pages (prefix cache): logits equal transformers' within 1e-4 relative (and the reference
  evaluator's on the high-level graph); compiled to an artifact, the manifest records the page size;
- IOBinding one numpy-backed OrtValue as both ``key_cache.{i}`` and ``key_cache_out.{i}``: the new K/V land in
  that numpy buffer at the slot mapping's rows and rows of other pages stay as they were.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from ember.compiler.passes.lower_paged_attention import lower_paged_attention
from ember.compiler.targets import get_target
from ember.graphs.architectures.llama import SAFETENSORS_RULES, LlamaArchConfig, build_graph
from ember.graphs.options import GraphOptions
from ember.graphs.ir.custom import paged_attention_reference, reference_evaluator_ops
from ember.graphs.nn import KVCacheStrategy
from ember.graphs.weights import SafetensorsWeights
from ember.graphs.weights.adapter import AdaptedWeights
from ember.runtime.pipelines import ModelSource

from ..graphs.paged_cases import make_case
from ..graphs.test_paged_attention_op import MIXED, feeds, paged_model
from ..reference.tiny_models import make_model

RTOL = 1e-4


def session_of(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# one op -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rotary_dim,interleaved", [(None, 0), (8, 0), (4, 0), (8, 1)],
                         ids=["no-rotary", "rotary", "partial-rotary", "interleaved"])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (2, 2)])
def test_lowered_op_matches_reference(rotary_dim, interleaved, window, heads, kv_heads):
    case = make_case(np.random.default_rng(0), **MIXED, heads=heads, kv_heads=kv_heads, rotary_dim=rotary_dim)
    model = ir.from_proto(paged_model(case, heads, kv_heads, window))
    if interleaved:
        next(iter(model.graph)).attributes["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", 1)
    lowered = ir.to_proto(lower_paged_attention(model))
    onnx.checker.check_model(lowered)
    assert {n.op_type for n in lowered.graph.node} >= {"ScatterND", "Gather", "MatMul", "Softmax"}
    assert not any(n.domain == "ember" for n in lowered.graph.node)
    out, key_out, value_out = session_of(lowered).run(None, feeds(case))
    ref_out, ref_key, ref_value = paged_attention_reference(
        case.query, case.key, case.value, case.key_cache, case.value_cache, case.page_table, case.slot_mapping,
        case.cache_lengths, case.input_lengths, case.cos, case.sin, num_heads=heads, kv_num_heads=kv_heads,
        page_size=case.page_size, sliding_window=window, rotary_interleaved=interleaved)
    for b, n in enumerate(case.input_lengths):
        np.testing.assert_allclose(out[b, :n], ref_out[b, :n], rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()  # padding tokens too (finite garbage)
    rows = slice(case.page_size, None)  # page 0 (scratch) takes the padding tokens' writes: unspecified
    np.testing.assert_allclose(key_out[rows], ref_key[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value_out[rows], ref_value[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [dict(cache_lengths=[5, 3], input_lengths=[1, 0]),  # a row with no token
                                   dict(cache_lengths=[0, 2], input_lengths=[6, 3])])
def test_scale_softcap_and_empty_rows(steps):
    """The op's scale and soft-capping reach the attention, and rows with nothing to compute (or that see no key)
    stay finite."""
    case = make_case(np.random.default_rng(4), **steps, heads=4, kv_heads=2, rotary_dim=8)
    model = ir.from_proto(paged_model(case, 4, 2, window=2))
    node = next(iter(model.graph))
    node.attributes["scale"] = ir.AttrFloat32("scale", 0.2)
    node.attributes["softcap"] = ir.AttrFloat32("softcap", 1.5)
    out, key_out, value_out = session_of(ir.to_proto(lower_paged_attention(model))).run(None, feeds(case))
    ref_out, _, _ = paged_attention_reference(
        case.query, case.key, case.value, case.key_cache, case.value_cache, case.page_table, case.slot_mapping,
        case.cache_lengths, case.input_lengths, case.cos, case.sin, num_heads=4, kv_num_heads=2,
        page_size=case.page_size, sliding_window=2, scale=0.2, softcap=1.5)
    for b, n in enumerate(case.input_lengths):
        np.testing.assert_allclose(out[b, :n], ref_out[b, :n], rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all() and np.isfinite(key_out[:case.page_size]).all()


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 1)])
def test_a_multi_token_row_gives_the_bits_of_one_token_steps(heads, kv_heads):
    """Position i of a 5-token row equals, bit for bit, a one-token step at cache length 9 + i over the same pool:
    what speculative verification (and chunked prefill) rely on to give plain decoding's tokens exactly."""
    case = make_case(np.random.default_rng(5), cache_lengths=[9], input_lengths=[5], heads=heads, kv_heads=kv_heads,
                     rotary_dim=8, head_dim=16)
    session = session_of(ir.to_proto(lower_paged_attention(ir.from_proto(paged_model(case, heads, kv_heads)))))
    out, key_out, value_out = session.run(None, feeds(case))
    for i in range(5):
        one = {**feeds(case), "query": case.query[:, i:i + 1], "key": case.key[:, i:i + 1],
               "value": case.value[:, i:i + 1], "slot_mapping": case.slot_mapping[:, i:i + 1],
               "cache_lengths": case.cache_lengths + i, "input_lengths": np.ones(1, np.int32),
               "key_cache.0": key_out, "value_cache.0": value_out}
        np.testing.assert_array_equal(session.run(None, one)[0][:, 0], out[:, i])


# tiny models --------------------------------------------------------------------------------------------------
class Pages:
    """A minimal page allocator (page 0 is the scratch page), handing out pages in a shuffled order."""

    def __init__(self, num_pages: int, page_size: int, seed: int):
        self.page_size = page_size
        self.free = [int(p) for p in np.random.default_rng(seed).permutation(np.arange(1, num_pages))]
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}

    def new(self, name: str, shared_pages: list[int] = (), shared_tokens: list[int] = ()) -> None:
        self.tables[name], self.tokens[name] = list(shared_pages), list(shared_tokens)

    def append(self, name: str, tokens: list[int]) -> tuple[int, np.ndarray]:
        """Reserve pages for ``tokens``; returns the cache length before them and their pool rows."""
        table, start = self.tables[name], len(self.tokens[name])
        while len(table) * self.page_size < start + len(tokens):
            table.append(self.free.pop())
        self.tokens[name] += tokens
        positions = start + np.arange(len(tokens))
        rows = np.array(table, np.int64)[positions // self.page_size] * self.page_size + positions % self.page_size
        return start, rows

    def batch(self, steps: list[tuple[str, list[int]]]) -> dict[str, np.ndarray]:
        """The graph's token and paging inputs for one call: rows right-padded, padding into page 0."""
        seq = max(len(t) for _, t in steps)
        pages = max(len(self.tables[n]) + -(-len(t) // self.page_size) for n, t in steps) + 1
        f = {"input_ids": np.zeros((len(steps), seq), np.int64),
             "input_lengths": np.array([len(t) for _, t in steps], np.int32),
             "cache_lengths": np.zeros(len(steps), np.int32),
             "page_table": np.zeros((len(steps), pages), np.int32),
             "slot_mapping": np.tile(np.arange(seq, dtype=np.int64) % self.page_size, (len(steps), 1))}
        for b, (name, tokens) in enumerate(steps):
            start, rows = self.append(name, tokens)
            f["input_ids"][b, :len(tokens)] = tokens
            f["cache_lengths"][b] = start
            f["slot_mapping"][b, :len(tokens)] = rows
            f["page_table"][b, :len(self.tables[name])] = self.tables[name]
        return f


@pytest.fixture(scope="module", params=[("llama-gqa-llama3", 4), ("mistral-window", 16)], ids=lambda p: p[0])
def paged_tiny(request, tmp_path_factory):
    variant, page_size = request.param
    directory = tmp_path_factory.mktemp(variant)
    hf_model = make_model(variant, directory)
    hf_config = ModelSource.resolve(directory).hf_config()
    config = LlamaArchConfig.from_hf(hf_config)
    high = build_graph(config, AdaptedWeights(SafetensorsWeights(directory), SAFETENSORS_RULES),
                       GraphOptions(kv_cache_strategy=KVCacheStrategy.PAGED, kv_cache_page_size=page_size))
    assert high.graph.metadata_props["ember.kv_page_size"] == str(page_size)
    high_proto = ir.to_proto(high)
    onnx.checker.check_model(high_proto, full_check=True)
    names = [i.name for i in high_proto.graph.input]
    assert names[:5] == ["input_ids", "input_lengths", "cache_lengths", "page_table", "slot_mapping"]
    assert names[5:7] == ["key_cache.0", "value_cache.0"]
    assert [o.name for o in high_proto.graph.output][:3] == ["logits", "key_cache_out.0", "value_cache_out.0"]
    lowered = ir.to_proto(get_target("ort-cpu").lower(ir.from_proto(high_proto)))
    onnx.checker.check_model(lowered)
    assert not any(n.domain == "ember" for n in lowered.graph.node)
    assert sum(n.op_type == "ScatterND" for n in lowered.graph.node) == 2 * config.num_layers
    reference = ReferenceEvaluator(high_proto, new_ops=reference_evaluator_ops())
    return hf_model, config, page_size, session_of(lowered), reference


def hf_last_logits(hf_model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0, -1].numpy()


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def test_paged_tiny_model_matches_transformers(paged_tiny):
    hf_model, config, page_size, session, reference = paged_tiny
    pool_rows = 48 * page_size
    shape = (pool_rows, config.num_kv_heads, config.head_dim)
    caches = {}
    for i in range(config.num_layers):
        caches[f"key_cache.{i}"] = np.zeros(shape, np.float32)
        caches[f"value_cache.{i}"] = np.zeros(shape, np.float32)
    pages = Pages(48, page_size, seed=1)
    rng = np.random.default_rng(0)

    def tokens(n: int, bos: bool = True) -> list[int]:
        return [1] * bos + rng.integers(4, config.vocab_size, n - bos).tolist()

    def step(batch: list[tuple[str, list[int]]], check_reference: bool = False) -> None:
        f = pages.batch(batch)
        logits, *outs = session.run(None, {**f, **caches})
        if check_reference:  # the high-level graph (ember.PagedAttention in numpy) means the same
            np.testing.assert_allclose(logits, reference.run(["logits"], {**f, **caches})[0], rtol=1e-4, atol=1e-4)
        for i in range(config.num_layers):  # the updated pools are the next call's
            caches[f"key_cache.{i}"], caches[f"value_cache.{i}"] = outs[2 * i], outs[2 * i + 1]
        errors = [relative_error(logits[b], hf_last_logits(hf_model, pages.tokens[name]))
                  for b, (name, _) in enumerate(batch)]
        print(f"rows {[(n, len(t)) for n, t in batch]}: max relative error {max(errors):.2g}")
        assert max(errors) < RTOL, errors

    for name in ("a", "b", "c"):
        pages.new(name)
    step([("a", tokens(19)), ("b", tokens(5)), ("c", tokens(9))], True)  # prefill, rows of different lengths
    for _ in range(3):
        step([(name, tokens(1, bos=False)) for name in ("a", "b", "c")])  # decode, three cache lengths
    assert any(np.diff(pages.tables["a"]) != 1)  # the pages are not contiguous
    # prefix cache: "e" starts with "a"'s full first page(s)
    full = min(2, len(pages.tokens["a"]) // page_size)
    pages.new("d")
    pages.new("e", pages.tables["a"][:full], pages.tokens["a"][:full * page_size])
    step([("a", [11]), ("d", tokens(7)), ("c", tokens(5, bos=False)), ("e", tokens(3, bos=False))], True)
    step([(name, [12]) for name in ("a", "b", "c", "d", "e")])  # decode all, the new sequences included


# in place -----------------------------------------------------------------------------------------------------
def test_io_binding_writes_into_the_bound_buffer(paged_tiny):
    hf_model, config, page_size, session, _ = paged_tiny
    num_pages = 12
    shape = (num_pages * page_size, config.num_kv_heads, config.head_dim)
    rng = np.random.default_rng(5)
    pools = {}
    for i in range(config.num_layers):
        for kind in ("key", "value"):
            pools[f"{kind}_cache.{i}"] = rng.standard_normal(shape).astype(np.float32)
    before = {k: v.copy() for k, v in pools.items()}
    pages = Pages(num_pages, page_size, seed=3)
    pages.new("x")
    pages.new("y")
    f = pages.batch([("x", [1, 5, 9, 13, 17, 21, 25]), ("y", [1, 6, 10])])
    expected = session.run(None, {**f, **pools})  # separate output buffers (copies)

    binding = session.io_binding()
    binding.bind_output("logits")  # outputs come back in binding order
    values = {}
    for name, array in f.items():
        binding.bind_cpu_input(name, array)
    for name, pool in pools.items():
        values[name] = ort.OrtValue.ortvalue_from_numpy(pool)
        assert values[name].data_ptr() == pool.ctypes.data  # the OrtValue is our numpy memory
        kind, layer = name.split(".")
        binding.bind_ortvalue_input(name, values[name])
        binding.bind_ortvalue_output(f"{kind}_out.{layer}", values[name])
    session.run_with_iobinding(binding)
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], expected[0], rtol=1e-5, atol=1e-6)

    slots = np.concatenate([f["slot_mapping"][b, :n] for b, n in enumerate(f["input_lengths"])])
    owned = {int(p) for p in f["page_table"].ravel() if p}
    other_pages = [p for p in range(1, num_pages) if p not in owned]
    assert other_pages
    out_names = [o.name for o in session.get_outputs()]
    for name, pool in pools.items():
        kind, layer = name.split(".")
        reference = expected[out_names.index(f"{kind}_out.{layer}")]
        np.testing.assert_allclose(pool[slots], reference[slots], rtol=1e-5, atol=1e-6)  # written in our buffer
        assert not np.allclose(pool[slots], before[name][slots])
        for p in other_pages:  # rows of other pages untouched
            np.testing.assert_array_equal(pool[p * page_size:(p + 1) * page_size],
                                          before[name][p * page_size:(p + 1) * page_size])
        untouched = np.ones(len(pool), bool)
        untouched[slots] = False
        untouched[:page_size] = False  # the scratch page takes the padding tokens' writes
        np.testing.assert_array_equal(pool[untouched], before[name][untouched])


# artifact -----------------------------------------------------------------------------------------------------
def test_paged_artifact_manifest(tmp_path):
    """Compiled PAGED, the artifact's manifest names the paged interface and records the graph's page size."""
    from ember.compiler.compile import CompileOptions
    from ember.runtime.pipelines import PIPELINE_REGISTRY
    from ember.runtime.compile_cache import compile_source

    make_model("llama-gqa-llama3", tmp_path / "model")
    source = ModelSource.resolve(tmp_path / "model")
    architecture = PIPELINE_REGISTRY.retrieve_architecture(tmp_path / "model")
    options = CompileOptions(kv_cache_strategy=KVCacheStrategy.PAGED, kv_cache_page_size=8)
    artifact = compile_source(source, architecture, options, tmp_path / "artifact", "0" * 64)
    manifest = artifact.manifest
    assert manifest["kv_cache_strategy"] == "paged"
    assert manifest["kv_params"]["page_size"] == 8
    inputs = {i["name"]: i for i in manifest["graph"]["inputs"]}
    assert inputs["page_table"]["dtype"] == "INT32" and inputs["page_table"]["shape"] == ["batch", "pages"]
    assert inputs["slot_mapping"]["dtype"] == "INT64" and inputs["slot_mapping"]["shape"] == ["batch", "sequence"]
    assert inputs["key_cache.0"]["shape"] == ["pool_rows", 2, 32]
    outputs = [o["name"] for o in manifest["graph"]["outputs"]]
    assert outputs == ["logits"] + [f"{kind}_cache_out.{i}" for i in range(3) for kind in ("key", "value")]
