"""``use_subgraphs``: identical blocks as one ONNX function called per layer (graphs/ir/subgraphs.py), valid ONNX that
the reference evaluator runs, inlined again by the compiler (compiler/passes/inline_functions.py) into the graph that
was built, node for node and name for name, so the artifact computes the same logits bit for bit."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator
from transformers import Qwen2Config, Qwen2ForCausalLM

import ember.graphs.ir.custom  # noqa: F401 - registers ember's schemas with onnx.checker
from ember.compiler.compile import CompileOptions, compile_graph
from ember.compiler.passes.inline_functions import inline_functions
from ember.graphs.architectures.llama.spec import SPEC
from ember.graphs.ir.custom import reference_evaluator_ops
from ember.graphs.ir.subgraphs import BLOCKS_DOMAIN, outline_layer_groups
from ember.graphs.nn.kv_cache import KVCacheStrategy
from ember.graphs.options import GraphOptions
from ember.graphs.weights.safetensors import SafetensorsWeights
from ember.runtime.pipelines.model_source import ModelSource
from tests.graphs.test_distributed_graphs import _bind, _feeds
from tests.reference.tiny_models import COMMON, make_model, save_random_model

STRATEGIES = list(KVCacheStrategy)
# Qwen 2 with layer_types: sliding (window 3, shorter than the test's 5-token prompt) and full attention alternate
MIXED_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama-gqa-llama3", directory)
    return directory


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mixed-windows")
    config = Qwen2Config(**{**COMMON, "num_hidden_layers": len(MIXED_LAYERS)}, num_key_value_heads=2,
                         tie_word_embeddings=False, use_sliding_window=True, sliding_window=3,
                         layer_types=MIXED_LAYERS)
    save_random_model(config, Qwen2ForCausalLM, directory)
    return directory


def _build(directory, strategy: KVCacheStrategy = KVCacheStrategy.PAGED, **options) -> ir.Model:
    config = ModelSource.resolve(directory).hf_config()
    return SPEC.build(config, SafetensorsWeights(directory), "safetensors",
                      GraphOptions(kv_cache_strategy=strategy, **options))


def _nodes(model: ir.Model) -> list[bytes]:
    """The main graph's nodes as written to ONNX (op, name, inputs, outputs, attributes), in order."""
    return [ir.serde.serialize_node(node).SerializeToString(deterministic=True) for node in model.graph]


def _calls(model: ir.Model) -> list[tuple[str, str]]:
    return [(node.op_type, node.name) for node in model.graph if node.domain == BLOCKS_DOMAIN]


def _compiled_logits(model: ir.Model, strategy: KVCacheStrategy, directory) -> tuple[np.ndarray, list]:
    """Logits of ``model`` compiled for ort-cpu through compile_graph, and the manifest's lowerings."""
    artifact = compile_graph(model, directory, CompileOptions(kv_cache_strategy=strategy), {"architecture": "test"})
    session = ort.InferenceSession(str(artifact.rank_model(0)), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], _bind(session, _feeds(strategy), {}))[0]
    return logits, artifact.manifest["lowerings"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_llama_is_one_function_called_per_layer_and_valid_onnx(llama, strategy):
    plain = _build(llama, strategy)
    outlined = outline_layer_groups(_build(llama, strategy))
    assert list(outlined.functions) == [(BLOCKS_DOMAIN, "block0", "")]
    assert _calls(outlined) == [("block0", f"/model/layers.{i}") for i in range(3)]
    assert len(outlined.graph) == len(plain.graph) - 3 * (len(outlined.functions[BLOCKS_DOMAIN, "block0", ""]) - 1)
    # each layer's weights are its call's inputs, and that call is their only user (the dropped copies are not)
    q_proj = outlined.graph.initializers["model.layers.2.self_attn.q_proj.weight"]
    assert [user.name for user, _ in q_proj.uses()] == ["/model/layers.2"]
    assert isinstance(q_proj.const_value, ir.LazyTensor)
    onnx.checker.check_model(ir.to_proto(outlined), full_check=True)
    assert outlined.graph.initializers.keys() == plain.graph.initializers.keys()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inlining_gives_back_the_graph_that_was_built(llama, strategy):
    plain = _build(llama, strategy)
    outlined = outline_layer_groups(_build(llama, strategy))
    weights = {name: value.const_value for name, value in outlined.graph.initializers.items()}
    inlined = inline_functions(outlined)
    assert not inlined.functions and inlined.graph.opset_imports == plain.graph.opset_imports
    assert _nodes(inlined) == _nodes(plain)
    # the very weight tensors (lazy, never loaded here), each read by its one node again
    assert {name: value.const_value for name, value in inlined.graph.initializers.items()} == weights
    assert all(v.const_value is weights[name] for name, v in inlined.graph.initializers.items())
    up = inlined.graph.initializers["model.layers.1.mlp.up_proj.weight"]
    assert [user.name for user, _ in up.uses()] == ["/model/layers.1/mlp/up_proj/MatMul"]


def test_a_tensor_parallel_rank_graph_outlines_and_inlines_too(llama):
    plain = _build(llama, tensor_parallel=2, rank=1)
    outlined = outline_layer_groups(_build(llama, tensor_parallel=2, rank=1))
    assert len(outlined.functions) == 1 and len(_calls(outlined)) == 3
    body = outlined.functions[BLOCKS_DOMAIN, "block0", ""]
    assert [n.op_type for n in body if n.domain == "ember"].count("AllReduce") == 2
    onnx.checker.check_model(ir.to_proto(outlined))
    assert _nodes(inline_functions(outlined)) == _nodes(plain)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_outlined_graph_computes_the_same_logits_bit_for_bit(llama, strategy, tmp_path):
    expected, lowerings = _compiled_logits(_build(llama, strategy), strategy, tmp_path / "plain")
    outlined = outline_layer_groups(_build(llama, strategy))
    got, got_lowerings = _compiled_logits(outlined, strategy, tmp_path / "outlined")
    assert np.array_equal(got, expected)
    # lowerings are recorded per node name: the inlined nodes carry their own layer's names
    assert got_lowerings == lowerings
    assert any(lowering["node"].startswith("/model/layers.2/") for lowering in got_lowerings)


def test_the_reference_evaluator_runs_the_outlined_high_level_graph(llama):
    strategy = KVCacheStrategy.PAGED
    plain, outlined = _build(llama, strategy), outline_layer_groups(_build(llama, strategy))
    feeds = _feeds(strategy)
    inputs = {}
    for value in plain.graph.inputs:  # the page pools: [pool_rows, kv_heads, head_dim], 4 pages of 16 rows
        pool = [64 if str(d) == "pool_rows" else d for d in value.shape]
        inputs[value.name] = feeds[value.name] if value.name in feeds else np.zeros(pool, np.float32)
    logits = [_reference(model).run(["logits"], inputs)[0] for model in (plain, outlined)]
    assert np.array_equal(logits[0], logits[1])


def _reference(model: ir.Model) -> ReferenceEvaluator:
    """onnx.reference's evaluator with ember's ops inside the model's functions too (given a ModelProto, it builds
    the functions' evaluators without ``new_ops``)."""
    proto, ops = ir.to_proto(model), reference_evaluator_ops()
    functions = [ReferenceEvaluator(f, new_ops=ops) for f in proto.functions]
    return ReferenceEvaluator(proto.graph, opsets={o.domain: o.version for o in proto.opset_import},
                              functions=functions, new_ops=ops)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_alternating_windows_make_two_functions_with_the_same_logits(mixed, strategy, tmp_path):
    outlined = outline_layer_groups(_build(mixed, strategy))
    assert _calls(outlined) == [("block0", "/model/layers.0"), ("block1", "/model/layers.1"),
                                ("block0", "/model/layers.2"), ("block1", "/model/layers.3")]
    onnx.checker.check_model(ir.to_proto(outlined))
    expected, lowerings = _compiled_logits(_build(mixed, strategy), strategy, tmp_path / "plain")
    got, got_lowerings = _compiled_logits(outlined, strategy, tmp_path / "outlined")
    assert np.array_equal(got, expected) and got_lowerings == lowerings


def test_explicit_groups_must_be_identical_blocks(mixed):
    with pytest.raises(ValueError, match=r"layer 1 is not identical to layer 0: its node "
                                         r"/model/layers.1/self_attn/PagedAttention .* attribute sliding_window "
                                         r"is 0 against 3"):
        outline_layer_groups(_build(mixed), [[0, 2, 1]])
    with pytest.raises(ValueError, match="the model has no layer 7"):
        outline_layer_groups(_build(mixed), [[0, 7]])
    with pytest.raises(ValueError, match="layer 2 is in two groups"):
        outline_layer_groups(_build(mixed), [[0, 2], [2]])
    partial = outline_layer_groups(_build(mixed), [[2, 0]])  # layers 1 and 3 stay as they are
    assert _calls(partial) == [("block0", "/model/layers.0"), ("block0", "/model/layers.2")]
    assert any(node.name.startswith("/model/layers.3/") for node in partial.graph)
    assert _nodes(inline_functions(partial)) == _nodes(_build(mixed))


def test_blocks_that_differ_in_an_attribute_are_named_in_the_error(llama):
    model = _build(llama)
    norm = next(n for n in model.graph if n.name == "/model/layers.1/post_attention_layernorm/RMSNormalization")
    norm.attributes["epsilon"] = ir.AttrFloat32("epsilon", 0.5)
    with pytest.raises(ValueError, match=r"layer 1 is not identical to layer 0: its node "
                                         r"/model/layers.1/post_attention_layernorm/RMSNormalization .* attribute "
                                         r"epsilon is 0.5 against"):
        outline_layer_groups(model, [[0, 1, 2]])
    outline_layer_groups(model)
    assert [op for op, _ in _calls(model)] == ["block0", "block1", "block0"]


def test_a_node_among_a_blocks_nodes_runs_after_its_call_or_keeps_the_block_inline(llama, caplog):
    model = _build(llama)
    norm = next(n for n in model.graph if n.name == "/model/layers.1/input_layernorm/RMSNormalization")
    probe = ir.Node("", "Identity", [norm.outputs[0]], name="/probe/Identity")  # reads layer 1, feeds nothing in it
    model.graph.insert_after(norm, probe)
    model.graph.outputs.append(probe.outputs[0])
    probe.outputs[0].name, probe.outputs[0].type = "probe", norm.outputs[0].type
    probe.outputs[0].shape = norm.outputs[0].shape
    outline_layer_groups(model)
    order = [node.name for node in model.graph]
    assert order.index("/probe/Identity") == order.index("/model/layers.1") + 1
    onnx.checker.check_model(ir.to_proto(model))
    assert sorted(_nodes(inline_functions(model))) == sorted(_nodes(_build(llama)) +
                                                            [ir.serde.serialize_node(probe).SerializeToString()])

    model = _build(llama)
    silu = next(n for n in model.graph if n.name == "/model/layers.1/mlp/Sigmoid")
    silu.name = "/elsewhere/Sigmoid"  # outside layer 1 by its name, between two of its nodes
    with pytest.raises(ValueError, match="layer 1 cannot be a function call: /elsewhere/Sigmoid .* reads the "
                                         "block's values and feeds its node /model/layers.1/mlp/SiLU"):
        outline_layer_groups(model, [[0, 1]])
    with caplog.at_level("INFO", logger="ember.graphs.ir.subgraphs"):
        outline_layer_groups(model)
    assert _calls(model) == [("block0", "/model/layers.0"), ("block0", "/model/layers.2")]
    assert "layer 1 stays in the main graph: /elsewhere/Sigmoid" in caplog.text
