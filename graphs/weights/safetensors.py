"""Memory-mapped safetensors checkpoints (one file or an index of shards).

The header (8-byte length, then JSON) is parsed here and each tensor is a view into ``np.memmap`` of its
file, so weights are read from the page cache once, when the compiler writes them, and never copied into
a second in-memory checkpoint. bfloat16 (which numpy lacks) is widened to float32 on load.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsWeights:
    """The tensors of a model directory's ``*.safetensors`` files."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            self._files = [self.path / s for s in shards]
        else:
            self._files = sorted(self.path.glob("*.safetensors"))
        if not self._files:
            raise FileNotFoundError(f"no *.safetensors weights in {self.path}")
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for file in self._files:
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self._entries[name] = (file, 8 + length, entry)
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
            raise ValueError(f"{name}: safetensors dtype {entry['dtype']} is not supported")
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        data = self._maps[file][offset + begin: offset + end]
        return data.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def load(self, name: str) -> np.ndarray:
        array = self.raw(name)
        if self.dtype_name(name) == "BF16":
            return _bf16_to_f32(array)
        if array.dtype.kind == "f":
            return array.astype(np.float32, copy=False)
        return np.asarray(array)
