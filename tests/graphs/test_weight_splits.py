"""A weight rule that splits one checkpoint tensor into several ember tensors by row ranges (Phi-3's fused
projections): values, shapes, the transform before the split, GGUF blocks kept per part, and the refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ember.graphs.weights.adapter import AdaptedWeights, RowRange, WeightRule


class ArraySource:
    """A checkpoint held in memory (the :class:`~ember.graphs.weights.source.WeightSource` protocol)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays, self.path = arrays, Path("memory.safetensors")

    def keys(self) -> list[str]:
        return list(self.arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.arrays[name].shape

    def load(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def files(self) -> list[Path]:
        return []


QKV = (RowRange(r"layers.\1.q.weight", 0, 4), RowRange(r"layers.\1.k.weight", 4, 6),
       RowRange(r"layers.\1.v.weight", 6, 8))


def test_a_split_gives_each_row_range_its_own_tensor():
    fused = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    weights = AdaptedWeights(ArraySource({"blk.0.qkv.weight": fused, "blk.0.norm": np.ones(3, np.float32)}),
                             [WeightRule(r"blk\.(\d+)\.qkv\.weight", None, splits=QKV)])
    assert sorted(weights.names()) == ["blk.0.norm", "layers.0.k.weight", "layers.0.q.weight", "layers.0.v.weight"]
    for name, rows in (("q", slice(0, 4)), ("k", slice(4, 6)), ("v", slice(6, 8))):
        ref = weights[f"layers.0.{name}.weight"]
        assert ref.shape == fused[rows].shape and ref.blocks is None
        np.testing.assert_array_equal(ref.load(), fused[rows])
        np.testing.assert_array_equal(ref.transposed().load(), fused[rows].T)


def test_the_transform_applies_to_the_whole_tensor_before_the_split():
    fused = np.arange(8, dtype=np.float32)[:, None].repeat(2, axis=1)
    reverse = WeightRule(r"blk\.(\d+)\.qkv\.weight", None, lambda w, _m: w[::-1], moves_rows=True, splits=QKV)
    weights = AdaptedWeights(ArraySource({"blk.3.qkv.weight": fused}), [reverse])
    np.testing.assert_array_equal(weights["layers.3.q.weight"].load()[:, 0], [7, 6, 5, 4])
    np.testing.assert_array_equal(weights["layers.3.v.weight"].load()[:, 0], [1, 0])


@pytest.mark.parametrize("ranges", [
    (RowRange("a", 0, 4), RowRange("b", 4, 7)),  # one row left over
    (RowRange("a", 0, 4), RowRange("b", 4, 9)),  # past the last row
    (RowRange("a", 0, 4), RowRange("b", 5, 8)),  # a gap
    (RowRange("a", 0, 5), RowRange("b", 4, 8)),  # an overlap
])
def test_ranges_that_do_not_tile_the_rows_are_refused_naming_the_tensor(ranges):
    source = ArraySource({"fused": np.zeros((8, 2), np.float32)})
    with pytest.raises(ValueError, match=r"memory.safetensors: tensor fused has shape \[8, 2\], but the config "
                                         r"makes it \d+ rows: a rows 0..\d, b rows"):
        AdaptedWeights(source, [WeightRule("fused", None, splits=ranges)])


def test_a_split_rule_names_its_parts_not_one_replacement():
    with pytest.raises(ValueError, match="a split rule names its parts"):
        WeightRule("fused", "one", splits=(RowRange("a", 0, 1),))


def test_gguf_blocks_survive_a_split(small_gguf):
    """Each part of a split block-quantized tensor keeps its rows' blocks (a row range moves whole rows), so a
    compiler pass can repack them; its floats are the same rows of the dequantized tensor."""
    from ember.graphs.weights.gguf import GGUFWeights

    path, expected = small_gguf
    source = GGUFWeights(path)
    table, qtype = expected["token_embd.weight"]  # Q8_0 [16, 64]
    parts = (RowRange("head.weight", 0, 6), RowRange("tail.weight", 6, 16))
    weights = AdaptedWeights(source, [WeightRule(r"token_embd\.weight", None, splits=parts)])
    raw = source.raw_blocks("token_embd.weight")
    for name, rows in (("head.weight", slice(0, 6)), ("tail.weight", slice(6, 16))):
        ref = weights[name]
        assert ref.blocks is not None and ref.blocks.qtype == qtype.name
        assert ref.blocks.shape == (rows.stop - rows.start, 64)
        np.testing.assert_array_equal(ref.blocks.load(), raw[rows])
        np.testing.assert_allclose(ref.load(), table[rows], rtol=0, atol=0)


def test_a_transform_that_does_not_move_rows_hides_the_blocks(small_gguf):
    from ember.graphs.weights.gguf import GGUFWeights

    path, _ = small_gguf
    rule = WeightRule(r"token_embd\.weight", None, lambda w, _m: w * 2,
                      splits=(RowRange("head.weight", 0, 6), RowRange("tail.weight", 6, 16)))
    weights = AdaptedWeights(GGUFWeights(path), [rule])
    assert weights["head.weight"].blocks is None and weights["tail.weight"].blocks is None
