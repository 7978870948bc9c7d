"""Memory-mapped safetensors checkpoints (one file or an index of shards).

The header (8-byte length, then JSON) is parsed here and each tensor is a view into ``np.memmap`` of its
file, so weights are read from the page cache once, when the compiler writes them, and never copied into
a second in-memory checkpoint. bfloat16 (which numpy lacks) is widened to float32 on load.

A checkpoint is a file from someone else, so the header is checked against the file before any tensor is
touched: the header length against the file size, the JSON, each tensor's dtype, shape and byte range
(``end - begin`` must be the bytes its shape and dtype take, inside the file), and an index's shard names
(plain files of the model folder, never a path out of it). A bad file is a :class:`ValueError` naming the
file and the tensor, when the checkpoint is opened, instead of an ``OverflowError``, ``MemoryError`` or
"cannot reshape array" from numpy later.
"""
from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# Bytes per element of every dtype the safetensors format defines (ember reads those in _DTYPES); a dtype not
# listed here is not safetensors.
_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
# The safetensors library's own limit on the JSON header: a longer one is not a real checkpoint's.
MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 16


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(file: Path) -> tuple[int, dict[str, dict]]:
    """``(data_start, {tensor name: entry})`` of one safetensors file, every entry checked against the file.

    Raises ValueError naming the file (and the tensor) for a header that does not describe the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise ValueError(f"{file}: safetensors header length {length} runs past the end of the file "
                             f"({size} bytes): truncated, or not a safetensors file")
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{file}: safetensors header of {length} bytes is over the limit of "
                             f"{MAX_HEADER_BYTES} bytes")
        text = f.read(length)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"{file}: safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"{file}: safetensors __metadata__ is not an object")
    data_start = 8 + length
    for name, entry in header.items():
        _check_entry(file, name, entry, size - data_start)
    return data_start, header


def _check_entry(file: Path, name: str, entry: object, data_bytes: int) -> None:
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ITEM_SIZES:
        raise ValueError(f"{where}: unknown safetensors dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise ValueError(f"{where}: shape {shape!r} is not a list of at most {MAX_DIMS} non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair of byte offsets")
    nbytes = prod(shape) * _ITEM_SIZES[dtype]
    begin, end = offsets
    if end - begin != nbytes:
        raise ValueError(f"{where}: {dtype} {shape} takes {nbytes} bytes but data_offsets {offsets} "
                         f"span {end - begin}")
    if end > data_bytes:
        raise ValueError(f"{where}: data ends at byte {end} of the data section, which has only {data_bytes} bytes "
                         f"(truncated?)")


def _shard_files(directory: Path, index: Path) -> list[Path]:
    """The shard files an index names (each a plain file name inside ``directory``)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"{index}: not valid JSON ({error})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map is not an object of tensor name -> shard file name")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise ValueError(f"{index}: shard {shard!r} is not a file name in the model folder")
        if not (directory / shard).is_file():
            raise FileNotFoundError(f"{index} names shard {shard}, which is not in {directory}")
    return [directory / s for s in shards]


class SafetensorsWeights:
    """The tensors of a model directory's ``*.safetensors`` files."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self._files = _shard_files(self.path, index)
        else:
            self._files = sorted(p for p in self.path.glob("*.safetensors") if p.is_file())
        if not self._files:
            raise FileNotFoundError(f"no *.safetensors weights in {self.path}")
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for file in self._files:
            data_start, header = read_header(file)
            for name, entry in header.items():
                if name in self._entries:
                    raise ValueError(f"{file}: tensor {name!r} is also in {self._entries[name][0].name}")
                self._entries[name] = (file, data_start, entry)
        self._maps: dict[Path, np.memmap] = {}

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def dtype_name(self, name: str) -> str:
        return self._entries[name][2]["dtype"]

    def files(self) -> list[Path]:
        return list(self._files)

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (a read-only view of the mapped file; bf16 as uint16)."""
        file, offset, entry = self._entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name!r}: safetensors dtype {entry['dtype']} is not supported; "
                             f"supported: {', '.join(_DTYPES)}")
        begin, end = entry["data_offsets"]
        if begin == end:
            return np.zeros(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        data = self._maps[file][offset + begin: offset + end]
        return data.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def load(self, name: str) -> np.ndarray:
        array = self.raw(name)
        if self.dtype_name(name) == "BF16":
            return _bf16_to_f32(array)
        if array.dtype.kind == "f":
            return array.astype(np.float32, copy=False)
        return np.asarray(array)
