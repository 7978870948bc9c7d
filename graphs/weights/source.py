"""What a checkpoint looks like to the graph builders: named arrays, loaded only when asked for.

Both checkpoint formats (safetensors directories and GGUF files) implement :class:`WeightSource`, so an
architecture's weight adapter (``graphs/architectures/<arch>/weights.py``) maps names without caring
where the bytes live. Loading is lazy: a graph refers to weights by name and the arrays are read (and,
for GGUF, dequantized) only when the compiler writes the artifact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class WeightSource(Protocol):
    """A checkpoint's tensors by their checkpoint names."""

    path: Path

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint, in file order."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's logical shape, in PyTorch order (a Linear weight is ``[out, in]``)."""

    def load(self, name: str) -> np.ndarray:
        """The tensor as a float32 (or integer, for integer tensors) numpy array of :meth:`shape`."""

    def files(self) -> list[Path]:
        """The files the tensors come from (hashed into the compile-cache key)."""


@runtime_checkable
class BlockWeightSource(WeightSource, Protocol):
    """A checkpoint that can keep block-quantized tensors (GGUF): their GGML block type and raw bytes, so that an
    encoding keeping the blocks reads them unchanged."""

    def block_type(self, name: str) -> str | None:
        """The GGML block type name of a block-quantized tensor (``Q4_1``, ...); None for float tensors."""

    def raw_blocks(self, name: str) -> np.ndarray:
        """A block-quantized tensor's bytes as uint8 ``[rows, bytes_per_row]``."""
