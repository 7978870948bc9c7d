"""``convert_to_half``: the ort-cuda half encodings' precision pass, on tiny Llamas lowered for ort-cuda.

- structure (float16 and bfloat16; head_dim 32 -> GroupQueryAttention, head_dim 20 -> explicit attention with its
  Softmax islands): float32 enters the graph only where it is meant to (the islands' mask values, the Casts
  around each island, the logits' Cast at the end); KV caches are half; norms stash in float32; the graph passes
  ``onnx.checker`` and shape inference, whose inferred float32 tensors are the islands' only;
- numerics (float16 only: onnxruntime's CPU provider runs it, casting inside where it has no float16 kernel; it has
  no bfloat16 MatMul): a prompt of two rows and a decode step, float16 logits against the float32 graph's within
  2 % of the largest logit, the same top token at every row.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from ember.compiler.passes.convert_to_half import FLOAT32_OUTPUTS, convert_to_half, float32_islands
from ember.compiler.targets import get_target
from ember.graphs.architectures.llama import SPEC
from ember.graphs.options import GraphOptions
from ember.graphs.weights import SafetensorsWeights
from ember.runtime.pipelines import ModelSource

from ..reference.tiny_models import COMMON, make_model, save_random_model

FLOAT = ir.DataType.FLOAT


@pytest.fixture(scope="module", params=[32, 20], ids=["hd32-gqa", "hd20-explicit"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"hd{request.param}")
    if request.param == 32:
        make_model("llama-gqa-llama3", directory)
    else:
        config = LlamaConfig(**{**COMMON, "hidden_size": 60, "num_attention_heads": 3}, num_key_value_heads=1,
                             head_dim=20, tie_word_embeddings=False)
        save_random_model(config, LlamaForCausalLM, directory, seed=3)
    source = ModelSource.resolve(directory)
    return request.param, lambda: SPEC.build(source.hf_config(), SafetensorsWeights(directory), "safetensors",
                                             GraphOptions())


def lowered(build, encoding: str) -> ir.Model:
    return get_target("ort-cuda").lower(build(), encoding)


@pytest.mark.parametrize("encoding", ["float16", "bfloat16"])
def test_float32_only_where_meant(checkpoint, encoding):
    head_dim, build = checkpoint
    model = lowered(build, encoding)
    half = ir.DataType[encoding.upper()]
    graph = model.graph
    island = float32_islands(graph)
    assert bool(island) == (head_dim == 20)  # explicit attention: a Softmax (+ its Where) per layer
    assert all(n.op_type in ("Softmax", "Where") for n in island) and len(island) == (6 if head_dim == 20 else 0)
    for value in graph.initializers.values():
        if value.dtype == FLOAT:
            assert all(use.node in island for use in value.uses()), value.name
    assert not [v.name for v in graph.inputs if v.dtype == FLOAT]
    kv = [v for v in graph.inputs if v.name.startswith("past_")]
    assert kv and {v.dtype for v in kv} == {half}
    outputs = {v.name: v.dtype for v in graph.outputs}
    assert outputs.pop("logits") == FLOAT and set(outputs.values()) == {half}
    for node in graph:
        if node.op_type == "Cast" and node.attributes["to"].value == FLOAT:
            readers = [use.node for use in node.outputs[0].uses()]
            assert node.outputs[0].is_graph_output() or (readers and all(r in island for r in readers)), node.name
        assert node.op_type != "Constant"
        if node.op_type in ("RMSNormalization", "LayerNormalization"):
            assert node.attributes["stash_type"].value == 1
        if node.op_type == "GroupQueryAttention":
            assert node.inputs[7].dtype == half  # the rotary tables: T
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    island_outputs = {o.name for n in island for o in n.outputs}
    floats = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    cast_up = {n.outputs[0].name for n in graph if n.op_type == "Cast" and n.attributes["to"].value == FLOAT}
    statistics = {n.outputs[i].name for n in graph for i in FLOAT32_OUTPUTS.get((n.domain, n.op_type), ())
                  if i < len(n.outputs)}  # the norms' float32 mean / inverse deviation outputs (unread)
    island_constants = {v.name for v in graph.initializers.values() if v.dtype == FLOAT}  # checked above
    assert floats <= island_outputs | cast_up | statistics | island_constants
    assert island_outputs <= floats  # each Softmax (and its Where) runs in float32


def run_two_steps(model: ir.Model, cache_dtype) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    caches = {name: np.zeros([2, *i.shape[1:2], 24, *i.shape[3:]], cache_dtype)
              for name, i in inputs.items() if name.startswith("past_")}
    rng = np.random.default_rng(4)
    ids = rng.integers(4, 150, (2, 9)).astype(np.int64)
    outputs = [o.name for o in session.get_outputs()]
    first = dict(zip(outputs, session.run(None, {"input_ids": ids, "input_lengths": np.array([9, 6], np.int32),
                                                  "cache_lengths": np.array([0, 0], np.int32), **caches})))
    caches = {name: first[name.replace("past_key_values", "present")] for name in caches}
    second = session.run(["logits"], {"input_ids": np.array([[7], [11]], np.int64),
                                      "input_lengths": np.array([1, 1], np.int32),
                                      "cache_lengths": np.array([9, 6], np.int32), **caches})[0]
    return np.concatenate([first["logits"], second])


def test_float16_logits_close_to_float32(checkpoint):
    _, build = checkpoint
    reference = run_two_steps(lowered(build, "float32"), np.float32)
    got = run_two_steps(lowered(build, "float16"), np.float16)
    assert got.dtype == np.float32
    error = np.abs(got - reference).max() / np.abs(reference).max()
    assert error < 2e-2, error
    assert (got.argmax(-1) == reference.argmax(-1)).all()


def test_only_half_types():
    with pytest.raises(ValueError, match="not a half type"):
        convert_to_half("float32")
