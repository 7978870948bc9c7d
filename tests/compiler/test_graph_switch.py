"""The decode slots' graph in a paged artifact (``compiler/slot_graph.py``, ``compiler/graph_switch.py``), on a real
tiny Llama through onnxruntime:

- each branch of the switched model computes what its graph alone computes, bit for bit, in every encoding of
  ort-cpu's decoders (RTN and kept GGUF blocks): logits, and the K/V it writes into buffers bound in place (so the
  ``If`` writes the bound buffers, not copies);
- the weights are held once: the switched model's data is the paged model's plus what the continuous graph alone
  holds (its rotary tables), not twice the weights; with 4-bit weights too;
- the manifest says how to bind the continuous branch (switch, renames, the paged-only inputs);
- graphs that do not correspond, and options the slots' graph cannot serve, are refused with a clear error; why
  ort-cpu-qdq holds none (onnxruntime does not load its weights' DequantizeLinear in a branch).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from ember.compiler.compile import CompileOptions
from ember.compiler.graph_switch import switch_graphs
from ember.compiler.slot_graph import SWITCH, attach_slot_graph, cache_renames
from ember.compiler.targets import get_target
from ember.graphs.nn.kv_cache import KVCacheStrategy
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig

from ..reference.tiny_gguf import DEFAULT_TYPES, write_tiny_llama_gguf
from ..reference.tiny_models import make_model

PAGE = 4
CACHED = 6  # tokens already in the cache when the step runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF Llama, two tiny GGUF Llamas (kept Q4_1 / Q4_0 / Q8_0 blocks; Q4_K blocks) and a compile cache."""
    model = tmp_path_factory.mktemp("tiny-switch")
    make_model("llama-gqa-llama3", model)
    gguf = tmp_path_factory.mktemp("tiny-switch-gguf")
    q4_k = {name: "Q4_K" for name in DEFAULT_TYPES[0]}
    return {"hf": model, "q4_1": write_tiny_llama_gguf(gguf / "blocks.gguf"),
            "q4_k": write_tiny_llama_gguf(gguf / "q4k.gguf", types=(q4_k, DEFAULT_TYPES[1]), hidden=256,
                                          intermediate=256),
            "cache": tmp_path_factory.mktemp("cache")}


def artifact(tiny, encoding: str, **kwargs):
    """The artifact of ``encoding`` (a GGUF's own blocks for q4_1 / q4_k, else the HF model)."""
    config = PipelineConfig(model_path=tiny.get(encoding, tiny["hf"]), cache_dir=tiny["cache"], encoding=encoding,
                            max_length=32, kv_cache_page_size=PAGE, max_batch_size=2, **kwargs)
    return PIPELINE_REGISTRY.retrieve(config)[1].pipeline_model.artifact


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options)


def step(model: ort.InferenceSession, kv: dict, buffers: dict[str, np.ndarray], extra: dict[str, np.ndarray]):
    """One decode step of one row after ``CACHED`` tokens, the cache buffers bound in place; logits and buffers."""
    binding = model.io_binding()
    feeds = {"input_ids": np.array([[3]], np.int64), "input_lengths": np.array([1], np.int32),
             "cache_lengths": np.array([CACHED], np.int32), **extra}
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    buffers = {name: array.copy() for name, array in buffers.items()}
    for layer in range(kv["num_layers"]):
        for (inp, out) in zip(*kv["names"](layer)):
            value = ort.OrtValue.ortvalue_from_numpy(buffers[inp])
            binding.bind_ortvalue_input(inp, value)
            binding.bind_ortvalue_output(out, value)
    binding.bind_output("logits", "cpu")
    model.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0], buffers


def kv_of(model_path, strategy: KVCacheStrategy) -> dict:
    """The cache's layers, heads, head size and names, read from a lowered graph's cache inputs."""
    from ember.graphs.nn.kv_cache import KVCacheParams

    inputs = {i.name: i.shape for i in session(model_path).get_inputs()}
    names = KVCacheParams(dtype="float32", n_kv_heads=1, head_dim=1, num_layers=1, cache_strategy=strategy)
    shape = inputs[names.input_names(0)[0]]
    heads, head_dim = shape[1], shape[-1]  # [batch, heads, length, head_dim] or [rows, heads, head_dim]
    layers = next(layer for layer in range(len(inputs) + 1) if names.input_names(layer)[0] not in inputs)
    params = KVCacheParams(dtype="float32", n_kv_heads=heads, head_dim=head_dim, num_layers=layers,
                           cache_strategy=strategy)
    return {"num_layers": layers, "heads": heads, "head_dim": head_dim,
            "names": lambda layer: (params.input_names(layer), params.output_names(layer))}


def random_buffers(kv: dict, shape, rng) -> dict[str, np.ndarray]:
    return {name: (rng.standard_normal(shape) * 0.5).astype(np.float32)
            for layer in range(kv["num_layers"]) for name in kv["names"](layer)[0]}


def renamed(buffers: dict[str, np.ndarray], renames: dict[str, str]) -> dict[str, np.ndarray]:
    return {renames.get(name, name): array for name, array in buffers.items()}


def lowered_gguf(path, encoding: str, strategy: KVCacheStrategy, page_size: int = PAGE) -> ir.Model:
    """A tiny GGUF (no tokenizer: not through the registry) built for ``strategy`` and lowered by ort-cpu."""
    from ember.graphs.architectures.llama import SPEC
    from ember.runtime.pipelines.model_source import ModelSource

    source = ModelSource.resolve(path)
    options = CompileOptions(kv_cache_strategy=strategy, kv_cache_page_size=page_size)
    graph = SPEC.build(source.hf_config(), source.open_weights(), "gguf", options.graph_options())
    return get_target("ort-cpu").lower(graph, encoding)


def three_models(tiny, encoding: str, directory) -> tuple[Path, Path, Path, dict[str, str]]:
    """The switched, paged and continuous model files of ``encoding``, and the switched one's renames: compiled
    artifacts for the HF model; for a GGUF's own blocks, lowered here and joined by ``attach_slot_graph``."""
    if encoding not in ("q4_1", "q4_k"):
        switched = artifact(tiny, encoding, decode_slots=1)
        manifest = switched.manifest
        assert manifest["kv_cache_strategy"] == "paged" and manifest["slot_graph"]["switch"] == SWITCH
        assert {i["name"] for i in manifest["slot_graph"]["idle_inputs"]} == {"page_table", "slot_mapping"}
        paged = artifact(tiny, encoding, kv_cache_strategy="paged", decode_slots=0).rank_model()
        continuous = artifact(tiny, encoding, kv_cache_strategy="continuous").rank_model()
        return switched.rank_model(), paged, continuous, manifest["slot_graph"]["renames"]
    paths = [directory / f"{name}.onnx" for name in ("switched", "paged", "continuous")]
    paged = lowered_gguf(tiny[encoding], encoding, KVCacheStrategy.PAGED)
    continuous = lowered_gguf(tiny[encoding], encoding, KVCacheStrategy.CONTINUOUS)
    ir.save(paged, paths[1], external_data="paged.onnx.data")
    ir.save(continuous, paths[2], external_data="continuous.onnx.data")
    layers = len(paged.graph.outputs) // 2
    ir.save(attach_slot_graph(paged, continuous, cache_renames(layers)), paths[0], external_data="switched.onnx.data")
    return paths[0], paths[1], paths[2], cache_renames(layers)


@pytest.mark.parametrize("encoding", ["float32", "q8_0", "q4_0", "q4_1", "q4_k"])
def test_each_branch_computes_what_its_graph_alone_does_bit_for_bit(tiny, encoding, tmp_path):
    if encoding in ("q4_1", "q4_k"):
        pytest.importorskip("gguf")
    switched, paged, continuous, renames = three_models(tiny, encoding, tmp_path)
    model = session(switched)
    rng = np.random.default_rng(0)

    kv = kv_of(continuous, KVCacheStrategy.CONTINUOUS)
    slots = random_buffers(kv, (1, kv["heads"], 32, kv["head_dim"]), rng)
    alone_logits, alone_kv = step(session(continuous), kv, slots, {})
    kv_switched = {**kv, "names": lambda layer: tuple(tuple(renames[n] for n in names)
                                                      for names in kv["names"](layer))}
    idle = {"page_table": np.zeros((1, 1), np.int32), "slot_mapping": np.zeros((1, 1), np.int64)}
    logits, written = step(model, kv_switched, renamed(slots, renames), {SWITCH: np.array(True), **idle})
    assert np.array_equal(logits, alone_logits)
    assert all(np.array_equal(written[renames[name]], alone_kv[name]) for name in slots)
    assert not np.array_equal(alone_kv["past_key_values.0.key"], slots["past_key_values.0.key"])  # written

    kv = kv_of(paged, KVCacheStrategy.PAGED)
    pools = random_buffers(kv, (4 * PAGE, kv["heads"], kv["head_dim"]), rng)
    pages = {"page_table": np.array([[1, 2, 3]], np.int32), "slot_mapping": np.array([[PAGE + CACHED]], np.int64)}
    alone_logits, alone_kv = step(session(paged), kv, pools, pages)
    logits, written = step(model, kv, pools, {SWITCH: np.array(False), **pages})
    assert np.array_equal(logits, alone_logits)
    assert all(np.array_equal(written[name], alone_kv[name]) for name in pools)
    assert not np.array_equal(alone_kv["key_cache.0"], pools["key_cache.0"])


@pytest.mark.parametrize("encoding", ["float32", "q4_0"])
def test_the_weights_are_held_once(tiny, encoding):
    def data_bytes(a) -> int:
        return (a.rank_model().parent / "model.onnx.data").stat().st_size

    switched = data_bytes(artifact(tiny, encoding, decode_slots=1))
    paged = data_bytes(artifact(tiny, encoding, kv_cache_strategy="paged", decode_slots=0))
    continuous = data_bytes(artifact(tiny, encoding, kv_cache_strategy="continuous"))
    assert paged <= switched < paged + 0.25 * continuous


def test_graphs_whose_outputs_do_not_correspond_are_refused(tiny):
    paged = ir.load(artifact(tiny, "float32", kv_cache_strategy="paged", decode_slots=0).rank_model())
    continuous = ir.load(artifact(tiny, "float32", kv_cache_strategy="continuous").rank_model())
    with pytest.raises(ValueError, match="outputs do not correspond"):
        switch_graphs(paged, continuous, SWITCH)  # without the cache renames
    assert cache_renames(1) == {"past_key_values.0.key": "key_cache.0", "past_key_values.0.value": "value_cache.0",
                                "present.0.key": "key_cache_out.0", "present.0.value": "value_cache_out.0"}


@pytest.mark.parametrize("options, message", [
    (dict(kv_cache_strategy=KVCacheStrategy.CONTINUOUS), "a paged KV cache"),
    (dict(kv_cache_strategy=KVCacheStrategy.PAGED, target="ort-cuda"), "CPU provider"),
    (dict(kv_cache_strategy=KVCacheStrategy.PAGED, tensor_parallel=2), "one rank"),
])
def test_what_the_slots_graph_cannot_serve_is_refused_at_compile_time(options, message):
    with pytest.raises(ValueError, match=message):
        CompileOptions(slot_graph=True, **options).validate()


def test_why_ort_cpu_qdq_holds_no_slots_graph(tiny, tmp_path):
    """onnxruntime's load-time DequantizeLinear -> MatMulNBits fusion looks the weight up in the branch's own graph:
    the switched ort-cpu-qdq model does not load (``Target.loads_in_branches``). Should a newer onnxruntime load it,
    this test says to let ort-cpu-qdq hold the slots' graph too."""
    paged = ir.load(artifact(tiny, "q4_0", kv_cache_strategy="paged", target="ort-cpu-qdq").rank_model())
    continuous = ir.load(artifact(tiny, "q4_0", kv_cache_strategy="continuous", target="ort-cpu-qdq").rank_model())
    assert "DequantizeLinear" in {node.op_type for node in paged.graph}
    ir.save(switch_graphs(paged, continuous, SWITCH, cache_renames(len(paged.graph.outputs) // 2)),
            tmp_path / "switched.onnx", external_data="switched.onnx.data")
    with pytest.raises(Exception, match="Missing required weight"):
        session(tmp_path / "switched.onnx")
