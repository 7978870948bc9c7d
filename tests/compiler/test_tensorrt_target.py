"""The ``tensorrt`` target's graph and the static check of it against TensorRT's ONNX parser (no GPU, no TensorRT).

- the target: registered, its runtime block (backend ``tensorrt`` on device kind ``cuda``), encodings, strategies;
- the parser table: pinned (10.1, from onnx-tensorrt's ``docs/operators.md``), and what it says of the ops ember
  emits;
- the checker refuses, naming the op, node and reason: a contrib op without a plugin, an op past the table's opsets,
  an op the parser lacks, a type TensorRT lacks or the op does not take, a quantized type outside Q/DQ, the checked
  restrictions (computed ``axes``, DequantizeLinear's zero point and inferred blocks), nested graphs, model-local
  functions, initializers; a plugin node (``plugin_version``) passes; a target whose output fails the check fails
  the compile;
- the decompositions (rotary, RMSNorm) against onnxruntime's own opset-23 kernels, every attribute form;
- tiny Llama / Qwen2 / Mistral models (GQA, MQA, head_dim 32, 16 and 20, bias, sliding window) lowered for tensorrt
  in float32 and q4_0, both KV strategies: only standard ops, and the checker passes; q4_0's written weights are
  INT4 with positive scales, the ones TensorRT would misread stay float32 (recorded).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from transformers import LlamaConfig, LlamaForCausalLM

from ember.compiler.passes.decompose_rms_norm import decompose_rms_norm
from ember.compiler.passes.decompose_rotary import decompose_rotary
from ember.compiler.passes.lowering_record import summarize
from ember.compiler.targets import TARGETS, get_target
from ember.compiler.targets.tensorrt_parser_table import OPERATORS, PARSER_SOURCE, TENSORRT_VERSION, UNSUPPORTED
from ember.compiler.targets.tensorrt_support import check_tensorrt_graph, require_tensorrt_graph
from ember.graphs.architectures.llama import SPEC
from ember.graphs.nn import KVCacheStrategy
from ember.graphs.options import GraphOptions
from ember.graphs.weights import SafetensorsWeights
from ember.runtime.pipelines import PIPELINE_REGISTRY, ModelSource, PipelineConfig

from ..reference.tiny_models import COMMON, make_model, save_random_model

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def test_target_is_registered_with_its_runtime():
    target = get_target("tensorrt")
    assert TARGETS["tensorrt"] is target
    assert target.runtime_block() == {"backend": "tensorrt", "device_kind": "cuda", "settings": {
        "providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}}
    assert target.encodings == ("float32", "float16", "q4_0")
    assert set(target.kv_strategies) == {KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED}


def test_the_table_is_the_pinned_parsers():
    assert TENSORRT_VERSION == "10.1.0" and "96e781103cfc4adf4a6bb557e94bac8e693f6f4c" in PARSER_SOURCE
    assert OPERATORS["ScatterND"].restrictions == "`reduction` is not supported"
    assert {t.name for t in OPERATORS["DequantizeLinear"].types} == {"INT8", "FLOAT8E4M3FN", "INT4"}
    assert {t.name for t in OPERATORS["Softmax"].types} == {"FLOAT", "FLOAT16", "BFLOAT16"}
    assert "INT64" in {t.name for t in OPERATORS["ConstantOfShape"].types}  # the table's "INF64"
    for newer in ("RMSNormalization", "RotaryEmbedding", "Attention"):  # past opset 20: no importer
        assert newer not in OPERATORS and newer not in UNSUPPORTED
    assert "BitShift" in UNSUPPORTED and "BitShift" not in OPERATORS


# --- the checker on hand-made graphs --------------------------------------------------------------------------

def model_of(nodes, inputs, outputs, initializers=(), opset=23, functions=()) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1),
               helper.make_opsetid("custom", 1)]
    return ir.from_proto(helper.make_model(graph, opset_imports=imports, ir_version=10, functions=list(functions)))


def vi(name, elem=F, shape=(2, 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def one(op, inputs=("x",), elem=F, out_elem=None, domain="", **attrs) -> ir.Model:
    node = helper.make_node(op, list(inputs), ["y"], name=f"my_{op.lower()}", domain=domain, **attrs)
    return model_of([node], [vi(i, elem) for i in inputs], [vi("y", out_elem or elem)])


def gqa(**attrs) -> ir.Model:
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v"], ["y"], name="attn0", domain="com.microsoft",
                            num_heads=2, kv_num_heads=1, **attrs)
    return model_of([node], [vi(n, shape=(1, 3, 8)) for n in "qkv"], [vi("y", shape=(1, 3, 8))])


def dequantize(k: int, n: int, zero_point: bool = False) -> ir.Model:
    blocks = -(-k // 32)
    inits = [helper.make_tensor("codes", TensorProto.INT4, [k, n], np.zeros(k * n, np.int8).tolist()),
             helper.make_tensor("scales", F, [blocks, n], np.ones(blocks * n, np.float32).tolist())]
    if zero_point:
        inits.append(helper.make_tensor("zp", TensorProto.INT4, [blocks, n], np.ones(blocks * n, np.int8).tolist()))
    node = helper.make_node("DequantizeLinear", ["codes", "scales"] + ["zp"] * zero_point, ["w"], name="dq",
                            axis=0, block_size=32)
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return model_of([node, matmul], [vi("x", shape=(1, k))], [vi("y", shape=(1, n))], inits)


def computed_axes() -> ir.Model:
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape", start=0, end=1),
             helper.make_node("Sub", ["s", "s"], ["axes"], name="zero"),
             helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="my_slice")]
    inits = [helper.make_tensor("starts", I64, [1], [0]), helper.make_tensor("ends", I64, [1], [1])]
    return model_of(nodes, [vi("x")], [vi("y")], inits)


def nested() -> ir.Model:
    inner = helper.make_graph([helper.make_node("Det", ["a"], ["b"], name="inner_det")], "then", [],
                              [vi("b", F, ())])
    other = helper.make_graph([helper.make_node("ReduceSum", ["a"], ["c"], name="sum", keepdims=0)], "else", [],
                              [vi("c", F, ())])
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=inner, else_branch=other)
    return model_of([node], [vi("cond", TensorProto.BOOL, ()), vi("a", F, (4, 4))], [vi("y", F, ())])


def local_function() -> ir.Model:
    body = onnx.helper.make_function("custom", "Block", ["a"], ["b"],
                                     [helper.make_node("RotaryEmbedding", ["a", "a", "a"], ["b"], name="in_function")],
                                     [helper.make_opsetid("", 23)])
    node = helper.make_node("Block", ["x"], ["y"], name="call", domain="custom")
    return model_of([node], [vi("x")], [vi("y")], functions=[body])


def quantized_add() -> ir.Model:
    init = helper.make_tensor("q", TensorProto.INT8, [2, 4], [1] * 8)
    node = helper.make_node("Add", ["q", "x"], ["y"], name="int8_add")
    return model_of([node], [vi("x", TensorProto.INT8)], [vi("y", TensorProto.INT8)], [init])


def uint16_initializer() -> ir.Model:
    init = helper.make_tensor("table", TensorProto.UINT16, [2], [1, 2])
    node = helper.make_node("Shape", ["table"], ["y"], name="shape")
    return model_of([node], [], [vi("y", I64, (1,))], [init])


REFUSED = {
    "contrib op without plugin": (gqa, ["com.microsoft.GroupQueryAttention node 'attn0'", "plugin_version"]),
    "op past opset 20": (lambda: one("RMSNormalization", ("x", "s")),
                         ["RMSNormalization node 'my_rmsnormalization'", "not in TensorRT 10.1"]),
    "op the parser lacks": (lambda: one("BitShift", ("x", "x"), TensorProto.UINT8, direction="LEFT"),
                            ["BitShift node 'my_bitshift'", "does not support BitShift"]),
    "type TensorRT lacks": (lambda: one("Add", ("x", "x"), TensorProto.DOUBLE), ["Add node 'my_add'", "DOUBLE"]),
    "type the op does not take": (lambda: one("MatMul", ("x", "x"), I64),
                                  ["MatMul node 'my_matmul'", "INT64", "MatMul takes"]),
    "quantized type outside Q/DQ": (quantized_add, ["Add node 'int8_add'", "quantized type"]),
    "computed axes": (computed_axes, ["Slice node 'my_slice'", "`axes`"]),
    "scatter reduction": (lambda: one("ScatterND", ("x", "i", "x"), reduction="add"),
                          ["ScatterND node 'my_scatternd'", "`reduction`"]),
    "short last block": (lambda: dequantize(60, 8), ["DequantizeLinear node 'dq'", "infers the block"]),
    "odd INT4 width": (lambda: dequantize(64, 7), ["DequantizeLinear node 'dq'", "even last dimension"]),
    "zero point": (lambda: dequantize(64, 8, zero_point=True), ["DequantizeLinear node 'dq'", "must be zero"]),
    "nested graph": (nested, ["Det node 'inner_det'", "does not support Det"]),
    "model-local function": (local_function, ["RotaryEmbedding node 'in_function'"]),
    "initializer type": (uint16_initializer, ["Shape node 'shape'", "UINT16"]),
    "custom domain, builtin name": (lambda: one("Gelu", domain="com.microsoft", plugin_version="1"),
                                    ["com.microsoft.Gelu node 'my_gelu'", "ignores the domain"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_checker_refuses_naming_the_op(case):
    build, expected = REFUSED[case]
    problems = check_tensorrt_graph(build())
    assert problems, case
    for text in expected:
        assert text in problems[0], (case, problems)
    with pytest.raises(ValueError) as error:
        require_tensorrt_graph(build())
    message = str(error.value)
    assert "\n" not in message and message.startswith("TensorRT 10.1.0's ONNX parser cannot take this graph: ")
    assert expected[0] in message


def test_initializers_and_graph_inputs_are_checked_after_the_nodes():
    problems = check_tensorrt_graph(uint16_initializer())
    assert problems[-1] == "initializer 'table': type UINT16 is not a TensorRT type"
    problems = check_tensorrt_graph(one("Add", ("x", "x"), TensorProto.DOUBLE))
    assert problems[0].startswith("Add node 'my_add'") and "graph input 'x': type DOUBLE" in problems[1]


def test_plugin_nodes_and_supported_ops_pass():
    assert check_tensorrt_graph(gqa(plugin_version="1")) == []
    assert check_tensorrt_graph(gqa(plugin_version="2", plugin_namespace="ember")) == []
    assert check_tensorrt_graph(gqa(plugin_version=1)) != []  # an int attribute: not the parser's string
    assert check_tensorrt_graph(dequantize(64, 8)) == []
    assert check_tensorrt_graph(one("Softmax", axis=-1)) == []


def test_a_target_whose_output_fails_the_check_fails_the_compile(tmp_path):
    make_model("llama-mqa-linear", tmp_path)
    model = high_level(tmp_path, KVCacheStrategy.CONTINUOUS)
    logits = model.graph.outputs[0]
    out = ir.Value(name="shifted", type=ir.TensorType(ir.DataType.FLOAT), shape=logits.shape)
    model.graph.append(ir.Node("", "Det", [logits], outputs=[out], name="/model/det"))
    model.graph.outputs.append(out)
    with pytest.raises(ValueError, match=r"Det node '/model/det': TensorRT 10.1.0's ONNX parser does not support Det"):
        get_target("tensorrt").lower(model, "float32")


# --- the decompositions, against onnxruntime's opset-23 kernels --------------------------------------------------

def run(model: ir.Model, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("layout,rotary_dim", [("3d", 0), ("3d", 12), ("4d", 0), ("4d", 8)])
def test_rotary_decomposition_matches_onnxruntime(layout, rotary_dim, interleaved):
    batch, seq, heads, head, positions = 2, 3, 3, 20, 16
    half = (rotary_dim or head) // 2
    shape = (batch, seq, heads * head) if layout == "3d" else (batch, heads, seq, head)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    angles = rng.standard_normal((positions, half)).astype(np.float32)
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rotary_dim}
    if layout == "3d":
        attrs["num_heads"] = heads
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], name="rope", **attrs)
    inits = [helper.make_tensor("cos", F, [positions, half], np.cos(angles).ravel().tolist()),
             helper.make_tensor("sin", F, [positions, half], np.sin(angles).ravel().tolist())]
    model = model_of([node], [vi("x", F, shape), vi("pos", I64, (batch, seq))], [vi("y", F, shape)], inits)
    feeds = {"x": x, "pos": rng.integers(0, positions, (batch, seq))}
    expected = run(model, feeds)
    decomposed = decompose_rotary(model)
    assert "RotaryEmbedding" not in {n.op_type for n in decomposed.graph}
    assert check_tensorrt_graph(decomposed) == []
    np.testing.assert_allclose(run(decomposed, feeds), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,axis", [(F, -1), (F, 1), (TensorProto.FLOAT16, -1)])
def test_rms_norm_decomposition_matches_onnxruntime(dtype, axis):
    rng = np.random.default_rng(1)
    numpy_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    x = (rng.standard_normal((2, 3, 8)) * 3).astype(numpy_dtype)
    scale_shape = [8] if axis == -1 else [3, 8]
    scale = rng.standard_normal(scale_shape).astype(numpy_dtype)
    node = helper.make_node("RMSNormalization", ["x", "scale"], ["y"], name="norm", axis=axis, epsilon=1e-3)
    init = onnx.numpy_helper.from_array(scale, "scale")
    model = model_of([node], [vi("x", dtype, (2, 3, 8))], [vi("y", dtype, (2, 3, 8))], [init])
    expected = run(model, {"x": x})
    decomposed = decompose_rms_norm(model)
    ops = [n.op_type for n in decomposed.graph]
    assert "RMSNormalization" not in ops and ops.count("Cast") == (2 if dtype != F else 0)
    assert check_tensorrt_graph(decomposed) == []
    tolerance = 1e-6 if dtype == F else 2e-3
    np.testing.assert_allclose(run(decomposed, {"x": x}).astype(np.float32), expected.astype(np.float32),
                               rtol=tolerance, atol=tolerance)


# --- tiny models lowered for tensorrt ---------------------------------------------------------------------------

def head_dim_20(directory):
    config = LlamaConfig(**{**COMMON, "hidden_size": 60, "num_attention_heads": 3}, num_key_value_heads=1,
                         head_dim=20, tie_word_embeddings=False)
    return save_random_model(config, LlamaForCausalLM, directory, seed=3)


CHECKPOINTS = {"llama-gqa-hd32": lambda d: make_model("llama-gqa-llama3", d),
               "llama-mqa-hd16": lambda d: make_model("llama-mqa-linear", d),
               "llama-mqa-hd20": head_dim_20,
               "qwen2-bias": lambda d: make_model("qwen2-bias", d),
               "mistral-window": lambda d: make_model("mistral-window", d)}


def high_level(directory, strategy) -> ir.Model:
    source = ModelSource.resolve(directory)
    return SPEC.build(source.hf_config(), SafetensorsWeights(directory), "safetensors",
                      GraphOptions(kv_cache_strategy=strategy, kv_cache_page_size=16))


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    CHECKPOINTS[request.param](directory)
    return request.param, directory


@pytest.mark.parametrize("encoding", ["float32", "q4_0"])
@pytest.mark.parametrize("strategy", [KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED], ids=["continuous", "paged"])
def test_tiny_models_lower_to_what_the_parser_takes(checkpoint, strategy, encoding):
    name, directory = checkpoint
    lowered = get_target("tensorrt").lower(high_level(directory, strategy), encoding)
    ops = {(n.domain, n.op_type) for n in lowered.graph}
    assert {domain for domain, _ in ops} == {""}, ops
    assert {op for _, op in ops} <= set(OPERATORS), ops
    assert {"ScatterND", "MatMul", "Softmax", "ReduceMean"} <= {op for _, op in ops}
    assert not {"RotaryEmbedding", "RMSNormalization"} & {op for _, op in ops}
    assert ("", "Gather") in ops if strategy is KVCacheStrategy.PAGED else True
    assert check_tensorrt_graph(lowered) == []
    dequantized = [n for n in lowered.graph if n.op_type == "DequantizeLinear"]
    if encoding == "float32":
        assert not dequantized
        return
    assert dequantized and all(n.inputs[0].dtype == ir.DataType.INT4 and len(n.inputs) == 2 for n in dequantized)
    kept = [r for r in summarize(lowered) if "TensorRT INT4" in " ".join(r.rejected)]
    if name == "llama-mqa-hd20":  # hidden 60: the projections reading it have K = 60, not a multiple of 32
        assert kept and all("K = 60" in r.rejected[0] and r.form == "MatMul (float32)" for r in kept)
    else:
        assert not kept


def test_compiled_q4_0_artifact_has_positive_int4_scales(tmp_path):
    make_model("llama-gqa-llama3", tmp_path / "model")
    config = PipelineConfig(model_path=tmp_path / "model", cache_dir=tmp_path / "cache", target="tensorrt",
                            encoding="q4_0", kv_cache_strategy=KVCacheStrategy.PAGED)
    artifact = PIPELINE_REGISTRY.resolve(config).artifact
    assert artifact.manifest["runtime"]["backend"] == "tensorrt" and artifact.manifest["target"] == "tensorrt"
    model = ir.load(artifact.path / "rank0" / "model.onnx")
    assert check_tensorrt_graph(model) == []
    dequantized = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dequantized) == 3 * 7 + 1  # seven projections a layer and the tied head
    for node in dequantized:
        codes, scales = node.inputs[0].const_value.numpy(), node.inputs[1].const_value.numpy()
        assert codes.dtype.name == "int4" or node.inputs[0].dtype == ir.DataType.INT4
        assert (scales > 0).all() and codes.shape[0] == 32 * scales.shape[0]
