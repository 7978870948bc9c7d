"""Pooling and normalization inside the encoder graph, against numpy on the graph's own last hidden state:
masked mean, first token, masked max and last valid token, each with and without L2 normalization; a
row's pooled embedding is the same alone and inside a padded batch; the pooled graphs run in the
reference evaluator too."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator
from transformers import AutoConfig

from ember.graphs.ir.custom import reference_evaluator_ops
from ember.graphs.nn import POOLING_MODES

from .tiny_encoders import build, make_model, padded_batch, session_for

LENGTHS = (9, 4, 7, 1)


def numpy_pool(h: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    m = mask.astype(np.float32)[:, :, None]
    if mode == "mean":
        return (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    if mode == "cls":
        return h[:, 0]
    if mode == "max":
        return np.where(m > 0, h, -1e9).max(1)
    last = mask.sum(1) - 1
    return h[np.arange(len(h)), last]


def numpy_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert-pooling")
    make_model("bert", directory)
    config = AutoConfig.from_pretrained(directory)
    feeds = padded_batch(config, LENGTHS, seed=2)
    (hidden,) = session_for(build(config, directory)).run(None, feeds)
    return directory, config, feeds, hidden


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_matches_numpy(tiny, mode, normalize):
    directory, config, feeds, hidden = tiny
    model = build(config, directory, pooling=mode, normalize=normalize)
    assert [o.name for o in model.graph.outputs] == ["embeddings"]
    assert model.graph.metadata_props["ember.pooling"] == mode
    (ours,) = session_for(model).run(None, feeds)
    expected = numpy_pool(hidden, feeds["attention_mask"], mode)
    if normalize:
        expected = numpy_normalize(expected)
        np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)
    assert ours.shape == (len(LENGTHS), config.hidden_size)
    err = float(np.abs(ours - expected).max())
    print(f"pooling {mode} normalize={normalize}: max abs error {err:.3g}")
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "max", "lasttoken"])
def test_pooled_graph_runs_in_the_reference_evaluator(tiny, mode):
    directory, config, feeds, _ = tiny
    proto = ir.to_proto(build(config, directory, pooling=mode, normalize=True))
    onnx.checker.check_model(proto, full_check=True)
    (expected,) = ReferenceEvaluator(proto, new_ops=reference_evaluator_ops()).run(None, feeds)
    (got,) = session_for(ir.from_proto(proto)).run(None, feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_a_row_pools_the_same_alone_and_in_a_padded_batch(tiny, mode):
    directory, config, feeds, _ = tiny
    session = session_for(build(config, directory, pooling=mode, normalize=True))
    (together,) = session.run(None, feeds)
    for row, n in enumerate(LENGTHS):
        alone = {k: v[row:row + 1, :n] for k, v in feeds.items()}
        (embedding,) = session.run(None, alone)
        np.testing.assert_allclose(embedding[0], together[row], atol=1e-5)
