"""Checkpoint names to ember names, as ordered rules (DESIGN.md: ``weights.py`` per architecture).

ember names weights after the Hugging Face module paths (``model.layers.3.self_attn.q_proj.weight``), so
a graph node is traceable to its weight whatever the checkpoint format. An architecture lists
:class:`WeightRule`s per format; the first rule whose pattern matches a checkpoint name decides its ember
name and an optional transform (GGUF's permuted Q/K rows, for example). A rule with no replacement drops
the tensor (rotary caches some checkpoints carry). A rule with ``splits`` gives one ember tensor per
:class:`RowRange` of the checkpoint tensor (Phi-3's fused ``qkv_proj`` is three projections stacked by rows).

A checkpoint that stores a weight block-quantized (GGUF Q4_0, Q4_1, Q8_0, ...) also exposes those blocks
(:class:`QuantizedBlocks`), so a compiler pass can repack them as they are instead of quantizing the
dequantized floats again. Blocks run along a row (the ``in`` dimension), so only transforms that move
whole rows (``WeightRule.moves_rows``) can be applied to them; any other transform hides the blocks. A row
range moves whole rows too, so each part of a split keeps the blocks of its rows.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .source import BlockWeightSource, WeightSource

Transform = Callable[[np.ndarray, "re.Match[str]"], np.ndarray]


@dataclass(frozen=True)
class RowRange:
    """Rows ``start:stop`` (axis 0: a Linear weight's output features) of a checkpoint tensor, named
    ``replacement`` (a ``re.sub`` template over the rule's match)."""

    replacement: str
    start: int
    stop: int


@dataclass(frozen=True)
class WeightRule:
    """``pattern`` (a full-match regex over checkpoint names) -> ``replacement`` (``re.sub`` template), or, with
    ``splits``, one ember tensor per row range (``replacement`` then None; the ranges must tile the rows, so a
    checkpoint whose fused tensor does not have the rows the config implies is refused, not cut wrongly).
    ``transform`` applies to the whole checkpoint tensor, before any split."""

    pattern: str
    replacement: str | None
    transform: Transform | None = None
    # The transform only reorders or selects rows (axis 0), so it applies to raw quantized rows as well.
    moves_rows: bool = False
    splits: tuple[RowRange, ...] = ()

    def __post_init__(self) -> None:
        if self.splits and self.replacement is not None:
            raise ValueError(f"weight rule {self.pattern!r}: a split rule names its parts, not one replacement")


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

    def __init__(self, source: WeightSource, rules: Sequence[WeightRule], dtype: npt.DTypeLike = np.float32):
        self.source = source
        self.dtype = np.dtype(dtype)
        self._refs: dict[str, WeightRef] = {}
        compiled = [(re.compile(r.pattern), r) for r in rules]
        for key in source.keys():
            for regex, rule in compiled:
                match = regex.fullmatch(key)
                if match is None:
                    continue
                if rule.splits:
                    for part, rows in self._row_ranges(key, match, rule):
                        self._add(part, key, match, rule, rows)
                elif rule.replacement is not None:
                    self._add(match.expand(rule.replacement), key, match, rule)
                break
            else:
                self._refs.setdefault(key, WeightRef(key, tuple(source.shape(key)), self._loader(key, None, None),
                                                     self._blocks(key, None, None)))

    def _add(self, name: str, key: str, match, rule: WeightRule, rows: slice | None = None) -> None:
        """``name`` -> checkpoint tensor ``key`` (its ``rows`` only, if given) through ``rule``'s transform."""
        shape = tuple(self.source.shape(key))
        if rows is not None:
            shape = (rows.stop - rows.start, *shape[1:])
        keeps_blocks = rule.transform is None or rule.moves_rows
        self._refs[name] = WeightRef(name, shape, self._loader(key, match, rule.transform, rows),
                                     self._blocks(key, match, rule.transform, rows) if keeps_blocks else None)

    def _row_ranges(self, key: str, match, rule: WeightRule) -> list[tuple[str, slice]]:
        """The split's parts as ``(ember name, rows)``; a ValueError naming the tensor unless they tile its rows."""
        shape = tuple(self.source.shape(key))
        parts = sorted(rule.splits, key=lambda r: r.start)
        edges = [0] + [r.stop for r in parts]
        if not shape or any(r.start != edges[i] or r.stop <= r.start for i, r in enumerate(parts)) \
                or edges[-1] != shape[0]:
            wanted = ", ".join(f"{match.expand(r.replacement)} rows {r.start}..{r.stop}" for r in parts)
            raise ValueError(f"{self.source.path}: tensor {key} has shape {list(shape)}, but the config makes it "
                             f"{edges[-1]} rows: {wanted}")
        return [(match.expand(r.replacement), slice(r.start, r.stop)) for r in rule.splits]

    def _blocks(self, key: str, match, transform: Transform | None, rows: slice | None = None
                ) -> QuantizedBlocks | None:
        source = self.source
        if not isinstance(source, BlockWeightSource):
            return None
        qtype = source.block_type(key)
        shape = tuple(source.shape(key))
        if qtype is None or len(shape) != 2:
            return None
        if rows is not None:
            shape = (rows.stop - rows.start, shape[1])

        def load() -> np.ndarray:
            raw = source.raw_blocks(key)
            raw = raw if transform is None else transform(raw, match)
            return np.ascontiguousarray(raw if rows is None else raw[rows])
        return QuantizedBlocks(qtype, (int(shape[0]), int(shape[1])), load)

    def _loader(self, key: str, match, transform: Transform | None,
                rows: slice | None = None) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            array = self.source.load(key)
            if transform is not None:
                array = transform(array, match)
            if rows is not None:
                array = np.ascontiguousarray(array[rows])
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
