"""ember's own parser for the header of a GGUF file: key/value metadata and the tensor directory.

A GGUF file is (all integers little-endian)::

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x    (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset

where a string is ``u64 length`` + UTF-8 bytes, and an array value is ``u32 item_type, u64 count``
followed by ``count`` items (scalars, strings, or again arrays).

``gguf.GGUFReader`` builds a numpy view per string, so files with large tokenizer vocabularies take
seconds to open. This module maps the file once (:mod:`mmap`) and walks it with
:func:`struct.unpack_from`; arrays of scalars are decoded in bulk with :func:`numpy.frombuffer` and
arrays of strings in one tight loop, so a 49k-token vocabulary plus its merges parse in tens of
milliseconds. Only GGUF versions 2 and 3 in little-endian byte order are read; anything else, or a
file that is truncated or corrupt, raises :class:`ValueError` naming the file.

The parser needs only numpy: tensor types are kept as their raw ggml numbers and tensor byte sizes
are left to the caller (``gguf.GGML_QUANT_SIZES``; see :mod:`.gguf`).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUF_MAGIC", "DEFAULT_ALIGNMENT", "SUPPORTED_VERSIONS", "ValueType", "TensorInfo",
           "GGUFHeader", "read_header", "peek_metadata"]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_VERSIONS = (2, 3)
_MAX_NESTING = 32  # arrays of arrays of ... deeper than this are treated as corruption


class ValueType(IntEnum):
    """GGUF metadata value types (the numbering of ``gguf.GGUFValueType`` / ggml's ``gguf_type``)."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Scalar types: (struct for one value, numpy dtype for a bulk array of them).
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    ValueType.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    ValueType.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    ValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    ValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    ValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    ValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    ValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    ValueType.BOOL: (struct.Struct("<?"), np.dtype("<u1")),
    ValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    ValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    ValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PREAMBLE = struct.Struct("<4sIQQ")
_ARRAY_HEAD = struct.Struct("<IQ")
_TENSOR_TAIL = struct.Struct("<IQ")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory."""
    name: str
    n_dims: int
    ne: tuple[int, ...]  # ggml order: fastest-varying dimension first (PyTorch shape reversed)
    ggml_type: int  # raw ggml type number (``gguf.GGMLQuantizationType`` value)
    offset: int  # from the start of the data section

    @property
    def n_elements(self) -> int:
        return prod(self.ne)

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch-order shape: ``ne`` reversed."""
        return self.ne[::-1]


@dataclass(eq=False)
class GGUFHeader:
    """Everything before a GGUF file's tensor data, plus the mapping of the whole file."""
    path: Path
    version: int
    tensor_count: int
    kv_count: int
    metadata: dict[str, Any]  # key -> python value (str, int, float, bool, or (nested) lists of those)
    value_types: dict[str, tuple[int, ...]]  # key -> (type,) or (ARRAY, item type, ...) as ValueType numbers
    tensors: list[TensorInfo]
    alignment: int
    data_start: int  # absolute byte offset of the data section
    file_size: int
    buffer: Any = field(default=None, repr=False)  # the read-only mmap of the file (None for an empty file)

    def tensor_bytes(self, info: TensorInfo, nbytes: int) -> np.ndarray:
        """A zero-copy, read-only uint8 view of ``nbytes`` bytes of ``info``'s data."""
        start = self.data_start + info.offset
        if start + nbytes > self.file_size:
            raise ValueError(f"{self.path}: tensor {info.name!r} needs bytes {start}..{start + nbytes} "
                             f"but the file has only {self.file_size} (truncated?)")
        if nbytes == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.frombuffer(self.buffer, dtype=np.uint8, count=nbytes, offset=start)


class _Corrupt(Exception):
    """Raised inside the parser; turned into a ValueError that names the file."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


class _Parser:
    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size

    def need(self, off: int, n: int, what: str) -> None:
        if n < 0 or off + n > self.size:
            raise _Corrupt(f"{what} needs {n} bytes at offset {off}, past the end of the file", off)

    def string(self, off: int, what: str, strict: bool = False) -> tuple[str, int]:
        self.need(off, 8, what)
        (n,) = _U64.unpack_from(self.buf, off)
        off += 8
        self.need(off, n, what)
        raw = self.buf[off:off + n]
        try:
            text = raw.decode("utf-8", "strict" if strict else "replace")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} is not valid UTF-8: {raw[:60]!r}", off) from None
        return text, off + n

    def strings(self, off: int, count: int, what: str) -> tuple[list[str], int]:
        """``count`` consecutive strings: the one hot loop (tokenizer vocabularies and merges)."""
        buf, size, unpack = self.buf, self.size, _U64.unpack_from
        if count * 8 > size - off:
            raise _Corrupt(f"{what}: {count} strings cannot fit in the {size - off} bytes left", off)
        out: list[str] = [""] * count
        for i in range(count):
            if off + 8 > size:
                raise _Corrupt(f"{what}: string {i} of {count} runs past the end of the file", off)
            (n,) = unpack(buf, off)
            off += 8
            stop = off + n
            if stop > size:
                raise _Corrupt(f"{what}: string {i} of {count} ({n} bytes) runs past the end of the file", off)
            out[i] = buf[off:stop].decode("utf-8", "replace")
            off = stop
        return out, off

    def value(self, vtype: int, off: int, what: str, depth: int = 0) -> tuple[Any, tuple[int, ...], int]:
        """Parse one value of type ``vtype`` at ``off``: ``(python value, types, next offset)``."""
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            st = scalar[0]
            self.need(off, st.size, what)
            return st.unpack_from(self.buf, off)[0], (vtype,), off + st.size
        if vtype == ValueType.STRING:
            text, off = self.string(off, what)
            return text, (vtype,), off
        if vtype != ValueType.ARRAY:
            raise _Corrupt(f"{what} has unknown value type {vtype}", off)
        if depth >= _MAX_NESTING:
            raise _Corrupt(f"{what}: arrays nested more than {_MAX_NESTING} deep", off)
        self.need(off, _ARRAY_HEAD.size, what)
        itype, count = _ARRAY_HEAD.unpack_from(self.buf, off)
        off += _ARRAY_HEAD.size
        scalar = _SCALARS.get(itype)
        if scalar is not None:
            dtype = scalar[1]
            nbytes = count * dtype.itemsize
            self.need(off, nbytes, f"{what} ({count} x {ValueType(itype).name})")
            if count == 0:
                return [], (vtype, itype), off
            array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=off)
            return (array != 0).tolist() if itype == ValueType.BOOL else array.tolist(), (vtype, itype), off + nbytes
        if itype == ValueType.STRING:
            strings, off = self.strings(off, count, what)
            return strings, (vtype, itype), off
        if itype != ValueType.ARRAY:
            raise _Corrupt(f"{what}: array of unknown value type {itype}", off)
        if count * _ARRAY_HEAD.size > self.size - off:
            raise _Corrupt(f"{what}: {count} nested arrays cannot fit in the {self.size - off} bytes left", off)
        items: list[Any] = []
        types: tuple[int, ...] = (vtype, itype)
        for i in range(count):
            item, item_types, off = self.value(itype, off, f"{what}[{i}]", depth + 1)
            if i == 0:
                types = (vtype, *item_types)
            items.append(item)
        return items, types, off

    def skip(self, vtype: int, off: int, what: str, depth: int = 0) -> int:
        """The offset just past a value of type ``vtype`` at ``off``, decoding nothing."""
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            self.need(off, scalar[0].size, what)
            return off + scalar[0].size
        if vtype == ValueType.STRING:
            self.need(off, 8, what)
            (n,) = _U64.unpack_from(self.buf, off)
            self.need(off + 8, n, what)
            return off + 8 + n
        if vtype != ValueType.ARRAY or depth >= _MAX_NESTING:
            raise _Corrupt(f"{what} has unknown value type {vtype} (or is nested too deep)", off)
        self.need(off, _ARRAY_HEAD.size, what)
        itype, count = _ARRAY_HEAD.unpack_from(self.buf, off)
        off += _ARRAY_HEAD.size
        scalar = _SCALARS.get(itype)
        if scalar is not None:
            self.need(off, count * scalar[0].size, what)
            return off + count * scalar[0].size
        if count * 8 > self.size - off:
            raise _Corrupt(f"{what}: {count} items cannot fit in the {self.size - off} bytes left", off)
        if itype == ValueType.STRING:
            buf, size, unpack = self.buf, self.size, _U64.unpack_from
            for _ in range(count):
                if off + 8 > size:
                    raise _Corrupt(f"{what}: its strings run past the end of the file", off)
                off += 8 + unpack(buf, off)[0]
            if off > size:
                raise _Corrupt(f"{what}: its strings run past the end of the file", off)
            return off
        for _ in range(count):
            off = self.skip(itype, off, what, depth + 1)
        return off

    def preamble(self, path: Path) -> tuple[int, int, int, int]:
        """``(version, tensor_count, kv_count, offset of the first KV)``; checks magic, version, byte order."""
        magic = bytes(self.buf[:4]) if self.size else b""
        if magic != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        if self.size < _PREAMBLE.size:
            raise ValueError(f"cannot parse GGUF file {path}: truncated header: {self.size} bytes, shorter "
                             f"than the {_PREAMBLE.size}-byte preamble (magic, version, tensor and KV counts)")
        _, version, tensor_count, kv_count = _PREAMBLE.unpack_from(self.buf, 0)
        if version & 0xFFFF == 0 and version >> 16:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            raise ValueError(f"{path} is a big-endian GGUF file (version {swapped}); ember reads only "
                             f"little-endian GGUF files")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"{path} is GGUF version {version}; ember reads versions "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
        return version, tensor_count, kv_count, _PREAMBLE.size


def _open(path: Path) -> tuple[Any, int]:
    """A read-only mapping of the file and its size (``b""`` for an empty file, which cannot be mapped)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b"", 0
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


def _corrupt_error(path: Path, e: Exception, size: int) -> ValueError:
    if isinstance(e, _Corrupt):
        return ValueError(f"cannot parse GGUF file {path}: truncated or corrupt header: {e} "
                          f"(file size {size} bytes)")
    return ValueError(f"cannot parse GGUF file {path}: truncated or corrupt header: "
                      f"{type(e).__name__}: {e} (file size {size} bytes)")


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the header of the GGUF file at ``path``: every KV, the tensor directory, the alignment and
    the start of the data section. The returned header keeps the file mapped (``buffer``) for
    :meth:`GGUFHeader.tensor_bytes`.
    """
    path = Path(path)
    buf, size = _open(path)
    try:
        return _read_header(path, buf, size)
    except BaseException:
        if isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:  # a numpy view is still alive (only in a traceback); leave it to the GC
                pass
        raise


def _read_header(path: Path, buf, size: int) -> GGUFHeader:
    p = _Parser(buf, size)
    version, tensor_count, kv_count, off = p.preamble(path)
    try:
        if kv_count * 12 > size - off:  # a KV is at least a key length and a value type
            raise _Corrupt(f"{kv_count} metadata entries cannot fit in the {size - off} bytes left", off)
        metadata: dict[str, Any] = {}
        value_types: dict[str, tuple[int, ...]] = {}
        for i in range(kv_count):
            key, off = p.string(off, f"the key of metadata entry {i}", strict=True)
            p.need(off, 4, f"the value type of {key!r}")
            (vtype,) = _U32.unpack_from(buf, off)
            if key in metadata:
                raise _Corrupt(f"duplicate metadata key {key!r}", off)
            metadata[key], value_types[key], off = p.value(vtype, off + 4, f"metadata {key!r}")

        if tensor_count * 24 > size - off:  # name length, n_dims, type, offset at least
            raise _Corrupt(f"{tensor_count} tensor entries cannot fit in the {size - off} bytes left", off)
        tensors: list[TensorInfo] = []
        names: set[str] = set()
        for i in range(tensor_count):
            name, off = p.string(off, f"the name of tensor {i}", strict=True)
            p.need(off, 4, f"the dimension count of tensor {name!r}")
            (n_dims,) = _U32.unpack_from(buf, off)
            off += 4
            p.need(off, 8 * n_dims + _TENSOR_TAIL.size, f"the dimensions, type and offset of tensor {name!r}")
            ne = struct.unpack_from(f"<{n_dims}Q", buf, off)
            off += 8 * n_dims
            ggml_type, offset = _TENSOR_TAIL.unpack_from(buf, off)
            off += _TENSOR_TAIL.size
            if name in names:
                raise _Corrupt(f"duplicate tensor name {name!r}", off)
            names.add(name)
            tensors.append(TensorInfo(name, n_dims, tuple(ne), ggml_type, offset))
    except (_Corrupt, struct.error) as e:
        raise _corrupt_error(path, e, size) from None

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0
            or alignment & (alignment - 1)):
        raise ValueError(f"{path}: general.alignment must be a positive power of two, got {alignment!r}")
    data_start = -(-off // alignment) * alignment
    return GGUFHeader(path=path, version=version, tensor_count=tensor_count, kv_count=kv_count,
                      metadata=metadata, value_types=value_types, tensors=tensors, alignment=alignment,
                      data_start=data_start, file_size=size, buffer=buf)


_MISSING = object()


def peek_metadata(path: str | os.PathLike[str], key: str, default: Any = None) -> Any:
    """One metadata value, walking the KVs without decoding the ones before it (and stopping at it).

    ``general.architecture`` is the first KV llama.cpp writes, so this reads a few hundred bytes.
    Returns ``default`` when the key is absent. Raises ValueError for a file that is not a readable GGUF.
    """
    path = Path(path)
    buf, size = _open(path)
    try:
        p = _Parser(buf, size)
        _version, _tensors, kv_count, off = p.preamble(path)
        try:
            for i in range(kv_count):
                k, off = p.string(off, f"the key of metadata entry {i}")
                p.need(off, 4, f"the value type of {k!r}")
                (vtype,) = _U32.unpack_from(buf, off)
                if k == key:
                    return p.value(vtype, off + 4, f"metadata {k!r}")[0]
                off = p.skip(vtype, off + 4, f"metadata {k!r}")
        except (_Corrupt, struct.error) as e:
            raise _corrupt_error(path, e, size) from None
        return default
    finally:
        if isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:
                pass
