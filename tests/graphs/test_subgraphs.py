"""``use_subgraphs``: identical blocks as one ONNX function called per layer (graphs/ir/subgraphs.py), valid ONNX, and
inlined again by the compiler into the same lowered graph, computing the same logits bit for bit."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import ember.graphs.ir.custom  # noqa: F401 - registers ember's schemas with onnx.checker
from ember.compiler.targets import get_target
from ember.graphs.architectures.llama.spec import SPEC
from ember.graphs.ir.subgraphs import BLOCKS_DOMAIN, outline_layer_groups
from ember.graphs.nn.kv_cache import KVCacheStrategy
from ember.graphs.options import GraphOptions
from ember.graphs.weights.safetensors import SafetensorsWeights
from ember.runtime.pipelines.model_source import ModelSource
from tests.graphs.test_distributed_graphs import _bind, _feeds, _session
from tests.reference.tiny_models import make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama-gqa-llama3", directory)
    return directory, ModelSource.resolve(directory).hf_config()


def _graph(tiny, strategy: KVCacheStrategy, use_subgraphs: bool) -> ir.Model:
    directory, config = tiny
    options = GraphOptions(kv_cache_strategy=strategy, use_subgraphs=use_subgraphs)
    return SPEC.build(config, SafetensorsWeights(directory), "safetensors", options)


@pytest.mark.parametrize("strategy", list(KVCacheStrategy))
def test_blocks_become_one_function_and_compile_to_the_same_logits(tiny, strategy):
    outlined = _graph(tiny, strategy, True)
    layers = tiny[1].num_hidden_layers
    assert len(outlined.functions) == 1
    calls = [node for node in outlined.graph if node.domain == BLOCKS_DOMAIN]
    assert [node.name for node in calls] == [f"/model/layers.{i}" for i in range(layers)]
    onnx.checker.check_model(ir.to_proto(outlined))
    plain = _graph(tiny, strategy, False)
    assert len(outlined.graph) < len(plain.graph) / 3
    target = get_target("ort-cpu")
    lowered = [target.lower(model) for model in (plain, outlined)]
    assert [n.op_type for n in lowered[0].graph] == [n.op_type for n in lowered[1].graph]
    feeds = _feeds(strategy)
    sessions = [_session(model) for model in lowered]
    logits = [s.run(["logits"], _bind(s, feeds, {}))[0] for s in sessions]
    assert np.array_equal(logits[0], logits[1])


def test_blocks_that_differ_make_separate_functions_or_an_error(tiny):
    model = _graph(tiny, KVCacheStrategy.PAGED, False)
    norm = next(n for n in model.graph if n.name.startswith("/model/layers.1/") and n.op_type == "RMSNormalization")
    norm.attributes["epsilon"] = ir.AttrFloat32("epsilon", 0.5)  # layer 1 is no longer layer 0's twin
    with pytest.raises(ValueError, match="layer 1 is not identical to layer 0"):
        outline_layer_groups(model, [[0, 1, 2]])
    with pytest.raises(ValueError, match="no layer 7"):
        outline_layer_groups(model, [[0, 7]])
    outline_layer_groups(model)
    assert len(model.functions) == 2
    assert [n.op_type for n in model.graph if n.domain == BLOCKS_DOMAIN] == ["block0", "block1", "block0"]
