"""Tensor-parallel rank graphs (graphs/nn/distributed/) and their cut into stages (compiler/passes/cut_at_collectives.py),
run in one process with the collectives' numpy references between the stages: the ranks together give the
single-device graph's logits. (The same over real processes and gloo: tests/runtime/distributed/.)"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from ember.compiler.passes.cut_at_collectives import cut_at_collectives, has_collectives
from ember.compiler.targets import get_target
from ember.graphs.architectures.llama.spec import SPEC
from ember.graphs.ir.custom.collectives import all_gather_reference, all_reduce_reference
from ember.graphs.nn.distributed import (HeadSplit, distribute_value, even_ranges, forward_sharded_layers,
                                         padded_ranges, take)
from ember.graphs.nn.kv_cache import KVCacheStrategy
from ember.graphs.options import GraphOptions
from ember.graphs.weights.safetensors import SafetensorsWeights
from ember.runtime.pipelines.model_source import ModelSource
from tests.reference.tiny_models import VOCAB, make_model

PAGE = 16


def test_head_split_divides_copies_or_names_the_counts():
    split = HeadSplit.of(8, 4, 2)
    assert split.query == [range(0, 4), range(4, 8)] and split.kv == [range(0, 2), range(2, 4)]
    mqa = HeadSplit.of(4, 1, 4)  # one KV head, copied to every rank
    assert mqa.kv == [range(0, 1)] * 4
    gqa = HeadSplit.of(9, 3, 3)  # SmolLM2: a KV head per rank
    assert gqa.query == [range(0, 3), range(3, 6), range(6, 9)] and gqa.kv == [range(0, 1), range(1, 2), range(2, 3)]
    copied = HeadSplit.of(8, 2, 4)  # ranks 0-1 read KV head 0, ranks 2-3 KV head 1
    assert copied.kv == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    with pytest.raises(ValueError, match="9 attention heads do not divide into 2"):
        HeadSplit.of(9, 3, 2)
    with pytest.raises(ValueError, match="3 KV heads neither divide into 2 parts"):
        HeadSplit.of(6, 3, 2)


def test_mapping_helpers():
    assert forward_sharded_layers([lambda x: x + 1, lambda x: x * 2], [1, 2]) == [2, 4]
    with pytest.raises(AssertionError, match="2 sharded layers for 3 inputs"):
        forward_sharded_layers([abs, abs], [1, 2, 3])
    assert take(iter(range(10)), 3) == [0, 1, 2] and take([1], 3) == [1]
    assert distribute_value("h", [0, 1, 2]) == ["h", "h", "h"]
    assert [len(r) for r in even_ranges(10, 3)] == [4, 3, 3]
    ranges, part = padded_ranges(10, 4)
    assert part == 3 and [list(r) for r in ranges] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_collective_references():
    shards = [np.full((2, 3), r, np.float32) for r in range(3)]
    assert np.array_equal(all_reduce_reference(shards), np.full((2, 3), 3, np.float32))
    assert all_gather_reference(shards, axis=-1).shape == (2, 9)
    with pytest.raises(ValueError, match="rank 1's input"):
        all_reduce_reference([np.zeros(2, np.float32), np.zeros(3, np.float32)])


def _session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feeds(strategy: KVCacheStrategy) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, VOCAB, (2, 5)).astype(np.int64),
             "input_lengths": np.array([5, 3], np.int32), "cache_lengths": np.array([0, 0], np.int32)}
    if strategy is KVCacheStrategy.PAGED:
        feeds["page_table"] = np.array([[1], [2]], np.int32)
        feeds["slot_mapping"] = np.array([[(r + 1) * PAGE + i if i < n else i for i in range(5)]
                                          for r, n in enumerate((5, 3))], np.int64)
    return feeds


def _bind(session: ort.InferenceSession, feeds: dict, carried: dict) -> dict:
    bound = {}
    for value in session.get_inputs():
        if value.name in feeds:
            bound[value.name] = feeds[value.name]
        elif value.name in carried:
            bound[value.name] = carried[value.name]
        else:  # a cache: [batch, kv, length, hd] or [pool_rows, kv, hd]
            shape = [2 if d == "batch" else 64 if d == "max_length" else 4 * PAGE if d == "pool_rows" else d
                     for d in value.shape]
            bound[value.name] = np.zeros(shape, np.float32)
    return bound


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(variant: str):
        if variant not in made:
            directory = tmp_path_factory.mktemp(variant)
            make_model(variant, directory)
            made[variant] = directory
        return made[variant]
    return get


@pytest.mark.parametrize("variant,world,strategy,target_name", [
    ("llama-gqa-llama3", 2, KVCacheStrategy.CONTINUOUS, "ort-cpu"),  # tied head, GQA
    ("llama-gqa-llama3", 4, KVCacheStrategy.PAGED, "ort-cpu"),  # 2 KV heads over 4 ranks: copied
    ("llama-mqa-linear", 2, KVCacheStrategy.PAGED, "ort-cpu"),  # MQA, untied head
    ("llama-mqa-linear", 4, KVCacheStrategy.CONTINUOUS, "ort-cpu"),
    ("qwen2-bias", 2, KVCacheStrategy.PAGED, "ort-cpu"),  # q/k/v bias
    ("llama-attention-bias", 2, KVCacheStrategy.CONTINUOUS, "ort-cpu"),  # o_proj bias: added once, after the all-reduce
    ("mistral-window", 2, KVCacheStrategy.PAGED, "ort-cpu"),
    # ort-cuda's float32 rank graphs (its explicit attention forms) on onnxruntime's CPU provider: no GPU here
    ("llama-gqa-llama3", 2, KVCacheStrategy.PAGED, "ort-cuda"),
    ("qwen2-bias", 2, KVCacheStrategy.CONTINUOUS, "ort-cuda"),
])
def test_rank_stages_with_reference_collectives_give_the_single_graph(checkpoints, variant, world, strategy,
                                                                     target_name):
    directory = checkpoints(variant)
    config = ModelSource.resolve(directory).hf_config()
    target = get_target(target_name)

    def lowered(tensor_parallel: int, rank: int) -> ir.Model:
        options = GraphOptions(kv_cache_strategy=strategy, tensor_parallel=tensor_parallel, rank=rank)
        return target.lower(SPEC.build(config, SafetensorsWeights(directory), "safetensors", options))

    feeds = _feeds(strategy)
    single = _session(lowered(1, 0))
    expected = single.run(["logits"], _bind(single, feeds, {}))[0]
    ranks = []
    for rank in range(world):
        model = lowered(world, rank)
        assert has_collectives(model)
        ranks.append([(_session(stage.model), stage.collectives_after) for stage in cut_at_collectives(model)])
    assert len({len(stages) for stages in ranks}) == 1
    # a stage after each collective: the embedding's all-reduce, two per block, the head's all-gather
    assert len(ranks[0]) == 2 * config.num_hidden_layers + 3
    carried = [{} for _ in range(world)]
    for stage in range(len(ranks[0])):
        for rank in range(world):
            session = ranks[rank][stage][0]
            outputs = session.run(None, _bind(session, feeds, carried[rank]))
            carried[rank].update({o.name: v for o, v in zip(session.get_outputs(), outputs)})
        for collective in ranks[0][stage][1]:
            shards = [carried[rank][collective.input] for rank in range(world)]
            result = (all_reduce_reference(shards) if collective.op == "AllReduce"
                      else all_gather_reference(shards, collective.axis))
            for rank in range(world):
                carried[rank][collective.output] = result
    rows = [0, 1]
    for rank in range(world):
        got = carried[rank]["logits"]
        np.testing.assert_allclose(got[rows], expected[rows], rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        assert np.array_equal(got.argmax(-1), expected.argmax(-1))
