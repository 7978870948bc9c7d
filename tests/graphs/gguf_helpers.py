"""Plain helpers shared by the GGUF tests (test_gguf_quants, test_gguf_header, test_gguf_weights and conftest)."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T  # noqa: E402

from ember.graphs.weights.gguf import GGUFWeights  # noqa: E402
from ember.graphs.weights.gguf_header import read_header  # noqa: E402

V = gguf.GGUFValueType

QUANTIZED = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
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


def write_and_close(writer) -> None:
    """Write a ``gguf.GGUFWriter``'s header, KV data and tensors to its file, then close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def flatten(value):
    """Nested lists flattened, as ``ReaderField.contents()`` gives arrays of arrays."""
    if isinstance(value, list):
        return [x for item in value for x in flatten(item)]
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
            assert flatten(ours) == field.contents(), key
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
