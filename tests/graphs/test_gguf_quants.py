"""ember's numpy dequantization of GGUF block formats, checked bit-for-bit against the ``gguf`` package."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from ember.graphs.weights.gguf_quants import SUPPORTED_TYPES, block_info, dequantize  # noqa: E402

from .gguf_helpers import QUANTIZED, random_blocks  # noqa: E402

LEGACY = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]  # the ones gguf.quants can also quantize


def test_block_info_and_supported_types():
    assert block_info(T.Q4_0) == (32, 18)
    assert block_info(T.Q8_0) == (32, 34)
    assert block_info(T.Q4_K) == (256, 144)
    assert block_info(T.Q6_K) == (256, 210)
    assert block_info(int(T.Q5_K)) == (256, 176)
    for t in (T.F32, T.F16, T.BF16, *QUANTIZED):
        assert t in SUPPORTED_TYPES


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 6])
def test_random_blocks_match_gguf(qtype, rows):
    bs = block_info(qtype)[0]
    shape = (rows, 3 * bs)
    raw = random_blocks(qtype, shape, seed=rows)
    ours = dequantize(raw, qtype, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))
    # flat input and a 3-D logical shape give the same numbers
    np.testing.assert_array_equal(dequantize(raw.reshape(-1), qtype, (rows, 1, 3 * bs)), ours.reshape(rows, 1, -1))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_quantized_floats_match_gguf(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    ours = dequantize(raw, qtype, x.shape)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))
    assert np.abs(ours - x).max() < (0.05 if qtype in (T.Q8_0,) else 0.6)


def test_k_quants_known_block():
    """One hand-built Q4_K block: scale 1 (d=0.5, sc=2) and min 0 in sub-block 0, q = 0..15."""
    block = np.zeros(144, dtype=np.uint8)
    block[0:2] = np.array([0.5], np.float16).view(np.uint8)
    block[4] = 2  # sub-block 0 scale
    block[16:32] = np.arange(16, dtype=np.uint8)  # low nibbles of group 0 = sub-block 0, weights 0..15
    w = dequantize(block, T.Q4_K, (256,))
    np.testing.assert_array_equal(w[:16], np.arange(16, dtype=np.float32))
    assert not w[16:].any()


def test_plain_types_round_trip():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    out = dequantize(x, T.F32, x.shape)
    np.testing.assert_array_equal(out, x)
    assert out.dtype == np.float32 and not np.shares_memory(out, x)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(dequantize(h, T.F16, x.shape), h.astype(np.float32))
    b = gguf.quants.quantize(x, T.BF16)  # uint8 bytes, as GGUFReader gives BF16 tensors
    bf = dequantize(b, T.BF16, x.shape)
    assert bf.dtype == np.float32 and bf.shape == x.shape
    np.testing.assert_array_equal(bf, gguf.quants.dequantize(b, T.BF16))
    np.testing.assert_allclose(bf, x, rtol=2 ** -8)
    np.testing.assert_array_equal(dequantize(b.view(np.uint16), T.BF16, x.shape), bf)


def test_dequantize_errors():
    with pytest.raises(ValueError, match=r"Q2_K.*supported:.*Q4_K"):
        dequantize(np.zeros(84, np.uint8), T.Q2_K, (256,))
    with pytest.raises(ValueError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), T.IQ2_XXS, (256,))
    with pytest.raises(ValueError, match="not supported"):
        dequantize(np.zeros(4, np.uint8), 12345, (1,))
    with pytest.raises(ValueError, match="bytes"):
        dequantize(np.zeros(35, np.uint8), T.Q8_0, (32,))
    with pytest.raises(ValueError, match="multiple of the block size"):
        dequantize(np.zeros(34, np.uint8), T.Q8_0, (2, 16))
    with pytest.raises(ValueError, match="values"):
        dequantize(np.zeros(3, np.float32), T.F32, (4,))
