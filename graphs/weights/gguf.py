"""GGUF checkpoints as a :class:`~ember.graphs.weights.source.WeightSource`.

ember's own header parser (:mod:`.gguf_header`) reads the key/value metadata and the tensor directory
from one read-only memory map of the file (``gguf.GGUFReader`` takes seconds on files with large
tokenizer vocabularies); tensor bytes are only touched when :meth:`GGUFWeights.load` asks for one, and
they are dequantized by ember's own numpy code (:mod:`.gguf_quants`). The ``gguf`` package supplies
only the ``GGMLQuantizationType`` enum and the block sizes.

Shapes are given in PyTorch order: GGUF stores ggml's ``ne`` (fastest-varying dimension first), so
a Linear weight with ``ne = [in, out]`` is reported as ``(out, in)``. Tensor names are GGUF's own
(``token_embd.weight``, ``blk.0.attn_q.weight``, ...); mapping them to an architecture's names is the
weight adapter's job.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .gguf_header import GGUFHeader, TensorInfo, peek_metadata, read_header
from .gguf_quants import SUPPORTED_TYPES, block_info, dequantize

__all__ = ["GGUFWeights", "SUPPORTED_TYPES", "block_info", "dequantize", "peek_architecture"]

_INT_TYPES = {
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}
# Types whose data is handed out as typed (little-endian) values; everything else is raw uint8 bytes.
_TYPED = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, **_INT_TYPES}


class GGUFWeights:
    """The tensors and metadata of one ``.gguf`` file, read lazily.

    >>> w = GGUFWeights("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> w.architecture, w.shape("blk.0.attn_k.weight"), w.qtype("blk.0.attn_k.weight").name
    ('llama', (192, 576), 'Q4_1')
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        header = read_header(self.path)  # ValueError (naming the file) if not a readable GGUF
        self._header: GGUFHeader = header
        self._tensors: dict[str, TensorInfo] = {t.name: t for t in header.tensors}
        self._nbytes: dict[str, int] = {}
        for t in header.tensors:  # every tensor's bytes must lie inside the file
            known = _known_type(t.ggml_type)
            sizes = GGML_QUANT_SIZES.get(known) if known is not None else None
            if known is None or sizes is None:
                continue  # a ggml type this gguf package does not know: qtype()/load() say so
            block_size, type_size = sizes
            n = t.n_elements
            if n % block_size:
                raise ValueError(f"{self.path}: tensor {t.name!r} has {n} elements, not a multiple of the "
                                 f"{known.name} block size {block_size}")
            nbytes = self._nbytes[t.name] = n // block_size * type_size
            end = header.data_start + t.offset + nbytes
            if end > header.file_size:
                raise ValueError(f"cannot parse GGUF file {self.path}: tensor {t.name!r} ends at byte {end} "
                                 f"but the file has only {header.file_size} (truncated?)")

    # --- WeightSource ---------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """PyTorch-order shape (ggml ``ne`` reversed)."""
        return self._tensor(name).shape

    def load(self, name: str) -> np.ndarray:
        """The tensor as a fresh float32 array (integer tensors keep their integer dtype) of :meth:`shape`."""
        qtype = self.qtype(name)
        shape = self.shape(name)
        data = self._data(name)
        if qtype in _INT_TYPES:
            return np.array(data, dtype=_INT_TYPES[qtype]).reshape(shape)
        try:
            return dequantize(data, qtype, shape)
        except ValueError as e:
            raise ValueError(f"{self.path}: tensor {name!r}: {e}") from e

    def files(self) -> list[Path]:
        return [self.path]

    # --- GGUF specifics -------------------------------------------------------------------

    def qtype(self, name: str) -> GGMLQuantizationType:
        """The tensor's GGML storage type (``F32``, ``Q4_1``, ``Q6_K``, ...)."""
        raw = self._tensor(name).ggml_type
        qtype = _known_type(raw)
        if qtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has GGML type {raw}, which the installed "
                             f"gguf package does not know")
        return qtype

    def block_type(self, name: str) -> str | None:
        """The GGML block type name (``Q4_1``, ``Q8_0``, ...) of a block-quantized tensor, else None.

        Float (F32/F16/BF16/F64) and integer tensors are not block-quantized."""
        qtype = self.qtype(name)
        return None if qtype in _TYPED or qtype == GGMLQuantizationType.BF16 else qtype.name

    def raw_blocks(self, name: str) -> np.ndarray:
        """A block-quantized tensor's bytes as uint8 ``[rows, bytes_per_row]`` (zero-copy, read-only)."""
        if self.block_type(name) is None:
            raise ValueError(f"{self.path}: tensor {name!r} is {self.qtype(name).name}, not block-quantized")
        shape = self.shape(name)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return self._data(name).reshape(rows, -1)

    def nbytes(self, name: str) -> int:
        """Bytes the tensor occupies in the file."""
        self.qtype(name)  # KeyError / ValueError for unknown names / types
        return self._nbytes[name]

    def metadata_keys(self) -> list[str]:
        """The file's key/value metadata keys in file order (without the ``GGUF.*`` header
        pseudo-fields, which :meth:`metadata` still answers)."""
        return list(self._header.metadata)

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value as python: strings decoded (UTF-8), arrays as lists (arrays of arrays as
        lists of lists), numbers as int/float, booleans as bool; ``default`` when the key is absent.
        ``GGUF.version``, ``GGUF.tensor_count`` and ``GGUF.kv_count`` answer the header's counts."""
        h = self._header
        value = h.metadata.get(key, _MISSING)
        if value is not _MISSING:
            return value
        pseudo = {"GGUF.version": h.version, "GGUF.tensor_count": h.tensor_count, "GGUF.kv_count": h.kv_count}
        return pseudo.get(key, default)

    @property
    def architecture(self) -> str:
        """``general.architecture`` (``llama``, ``qwen2``, ...)."""
        arch = self.metadata("general.architecture")
        if not isinstance(arch, str):
            raise ValueError(f"{self.path} has no general.architecture metadata")
        return arch

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"GGUFWeights({str(self.path)!r}, {len(self)} tensors)"

    def _tensor(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path} ({len(self._tensors)} tensors, "
                           f"e.g. {', '.join(list(self._tensors)[:3])})") from None

    def _data(self, name: str) -> np.ndarray:
        """The tensor's bytes in the file, zero-copy and read-only: typed values of :meth:`shape` for
        F32/F16/F64/integer tensors, flat raw uint8 blocks for quantized ones (and BF16)."""
        qtype = self.qtype(name)
        raw = self._header.tensor_bytes(self._tensors[name], self._nbytes[name])
        dtype = _TYPED.get(qtype)
        return raw if dtype is None else raw.view(np.dtype(dtype).newbyteorder("<")).reshape(self.shape(name))


_MISSING = object()


def _known_type(raw: int) -> GGMLQuantizationType | None:
    try:
        return GGMLQuantizationType(raw)
    except ValueError:
        return None


def peek_architecture(path: str | os.PathLike[str]) -> str | None:
    """``general.architecture`` read straight from the header, without parsing the whole metadata.

    Decodes nothing before the key (llama.cpp writes it first, so this reads a few hundred bytes).
    Returns None if the file has no such string key; raises ValueError if it is not a readable GGUF file.
    """
    arch = peek_metadata(path, "general.architecture")
    return arch if isinstance(arch, str) else None
