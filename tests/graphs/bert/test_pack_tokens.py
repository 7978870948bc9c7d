"""The ort-cpu pass that runs an encoder's token-wise ops on the valid tokens only (``pack_encoder_tokens``):
it applies to encoder graphs (and keeps their results: the other tests in this folder run the lowered
graph against transformers and the reference evaluator), and leaves decoder graphs unchanged."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from transformers import AutoConfig

from ember.compiler.passes.pack_encoder_tokens import pack_encoder_tokens
from ember.compiler.targets import get_target
from ember.graphs.architectures import LLAMA
from ember.graphs.options import GraphOptions
from ember.graphs.weights import SafetensorsWeights

from ...reference.tiny_models import make_model as make_decoder
from .tiny_encoders import build, make_model, padded_batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert-pack")
    make_model("bert", directory)
    return directory, AutoConfig.from_pretrained(directory)


def run(model: ir.Model, feeds) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("pooling", [None, "mean"])
def test_encoder_is_packed_and_keeps_its_results(tiny, pooling):
    directory, config = tiny
    lowered = get_target("ort-cpu").lower(build(config, directory, pooling=pooling))
    proto = ir.to_proto(lowered)
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["NonZero"] == 1
    assert [o.name for o in proto.graph.output] == ["embeddings" if pooling else "last_hidden_state"]
    # one unpack per attention (its fused q|k|v split in three) and one for the output or the pooling
    assert sum(n.name.startswith("/unpack/") and n.op_type == "Gather" for n in proto.graph.node) == 3 * 2 + 1

    unpacked = build(config, directory, pooling=pooling)
    for compiler_pass in get_target("ort-cpu").passes:
        if compiler_pass is not pack_encoder_tokens:
            unpacked = compiler_pass(unpacked)
    feeds = padded_batch(config, (9, 1, 5, 9), seed=3)
    ours, reference = run(ir.from_proto(proto), feeds), run(unpacked, feeds)
    if pooling is None:
        valid = feeds["attention_mask"].astype(bool)
        ours, reference = ours[valid], reference[valid]
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_decoder_graphs_are_unchanged(tmp_path):
    make_decoder("qwen2-bias", tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    model = LLAMA.build(config, SafetensorsWeights(tmp_path), "safetensors", GraphOptions())
    for compiler_pass in get_target("ort-cpu").passes:
        if compiler_pass is not pack_encoder_tokens:
            model = compiler_pass(model)
    before = ir.to_proto(model).SerializeToString()
    assert ir.to_proto(pack_encoder_tokens(model)).SerializeToString() == before


def test_attention_without_a_mask_is_left_unpacked():
    """No mask input: which tokens are valid is not known, so nothing is packed (the pass raised IndexError)."""
    from onnx import TensorProto, helper

    shape = [1, 4, 8]
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=2, kv_num_heads=2)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    assert [n.op_type for n in pack_encoder_tokens(model).graph] == ["Attention"]
