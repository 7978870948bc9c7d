"""Checkpoint names to ember names, as ordered rules (DESIGN.md: ``weights.py`` per architecture).

ember names weights after the Hugging Face module paths (``model.layers.3.self_attn.q_proj.weight``), so
a graph node is traceable to its weight whatever the checkpoint format. An architecture lists
:class:`WeightRule`s per format; the first rule whose pattern matches a checkpoint name decides its ember
name and an optional transform (GGUF's permuted Q/K rows, for example). A rule with no replacement drops
the tensor (rotary caches some checkpoints carry).

A checkpoint that stores a weight block-quantized (GGUF Q4_0, Q4_1, Q8_0, ...) also exposes those blocks
(:class:`QuantizedBlocks`), so a compiler pass can repack them as they are instead of quantizing the
dequantized floats again. Blocks run along a row (the ``in`` dimension), so only transforms that move
whole rows (``WeightRule.moves_rows``) can be applied to them; any other transform hides the blocks.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .source import WeightSource

Transform = Callable[[np.ndarray, "re.Match[str]"], np.ndarray]


@dataclass(frozen=True)
class WeightRule:
    """``pattern`` (a full-match regex over checkpoint names) -> ``replacement`` (``re.sub`` template)."""

    pattern: str
    replacement: str | None
    transform: Transform | None = None
    # The transform only reorders or selects rows (axis 0), so it applies to raw quantized rows as well.
    moves_rows: bool = False


@dataclass(frozen=True)
class QuantizedBlocks:
    """A 2-D weight ``[rows, cols]`` as the checkpoint stores it: GGML block type and raw row bytes.

    ``load()`` returns uint8 ``[rows, bytes_per_row]`` (rows in ember's order: row transforms applied).
    The blocks describe the ``[out, in]`` Linear weight (``[vocab, dim]`` for a table) whatever the
    orientation of the float initializer the graph uses.
    """

    qtype: str
    shape: tuple[int, int]
    load: Callable[[], np.ndarray]


@dataclass(frozen=True)
class WeightRef:
    """One ember weight: its name, float shape and how to load it (lazily)."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    blocks: QuantizedBlocks | None = None

    def transposed(self) -> "WeightRef":
        """The 2-D weight as ``[in, out]``: what ONNX ``MatMul`` wants for a ``[out, in]`` Linear weight.

        ``blocks`` (if any) still describe the ``[out, in]`` weight."""
        load = self.load
        return WeightRef(self.name, self.shape[::-1], lambda: np.ascontiguousarray(load().T), self.blocks)


class AdaptedWeights:
    """A checkpoint seen through an architecture's rules: ember name -> :class:`WeightRef`."""

    def __init__(self, source: WeightSource, rules: Sequence[WeightRule], dtype: np.dtype = np.float32):
        self.source = source
        self.dtype = np.dtype(dtype)
        self._refs: dict[str, WeightRef] = {}
        compiled = [(re.compile(r.pattern), r) for r in rules]
        for key in source.keys():
            for regex, rule in compiled:
                match = regex.fullmatch(key)
                if match is None:
                    continue
                if rule.replacement is not None:
                    name = match.expand(rule.replacement)
                    blocks = self._blocks(key, match, rule) if rule.transform is None or rule.moves_rows else None
                    self._refs[name] = WeightRef(name, tuple(source.shape(key)),
                                                 self._loader(key, match, rule.transform), blocks)
                break
            else:
                self._refs.setdefault(key, WeightRef(key, tuple(source.shape(key)),
                                                     self._loader(key, None, None), self._blocks(key, None, None)))

    def _blocks(self, key: str, match, rule: WeightRule | None) -> QuantizedBlocks | None:
        qtype = getattr(self.source, "block_type", lambda _key: None)(key)
        shape = tuple(self.source.shape(key))
        if qtype is None or len(shape) != 2:
            return None
        transform = rule.transform if rule is not None else None

        def load() -> np.ndarray:
            raw = self.source.raw_blocks(key)
            return raw if transform is None else np.ascontiguousarray(transform(raw, match))
        return QuantizedBlocks(qtype, (int(shape[0]), int(shape[1])), load)

    def _loader(self, key: str, match, transform: Transform | None) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            array = self.source.load(key)
            if transform is not None:
                array = transform(array, match)
            return array.astype(self.dtype, copy=False)
        return load

    def __contains__(self, name: str) -> bool:
        return name in self._refs

    def __getitem__(self, name: str) -> WeightRef:
        try:
            return self._refs[name]
        except KeyError:
            raise KeyError(f"weight {name!r} is not in {self.source.path}") from None

    def names(self) -> list[str]:
        return list(self._refs)
