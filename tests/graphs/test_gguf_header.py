"""ember's GGUF header parser, checked against ``gguf.GGUFReader``: every value type, hand-built files,
corrupt, big-endian and truncated files."""
from __future__ import annotations

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from ember.graphs.weights.gguf import GGUFWeights, peek_architecture  # noqa: E402
from ember.graphs.weights.gguf_header import peek_metadata, read_header  # noqa: E402

from .gguf_helpers import V, assert_agrees_with_reader, flatten, random_blocks, write_and_close  # noqa: E402

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
    write_and_close(w)
    return path, expected


def test_header_matches_reader_every_value_type(every_type_gguf):
    path, expected = every_type_gguf
    header = assert_agrees_with_reader(path)
    assert header.version == 3 and header.alignment == 64
    assert header.metadata == expected
    assert list(header.metadata) == list(expected)
    for key, value in expected.items():
        got = header.metadata[key]
        for a, b in zip(flatten(got), flatten(value), strict=True):  # bools stay bools, ints stay ints
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
    write_and_close(w)
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
