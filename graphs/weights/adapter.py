"""Checkpoint names to ember names, as ordered rules (DESIGN.md: ``weights.py`` per architecture).

ember names weights after the Hugging Face module paths (``model.layers.3.self_attn.q_proj.weight``), so
a graph node is traceable to its weight whatever the checkpoint format. An architecture lists
:class:`WeightRule`s per format; the first rule whose pattern matches a checkpoint name decides its ember
name and an optional transform (GGUF's permuted Q/K rows, for example). A rule with no replacement drops
the tensor (rotary caches some checkpoints carry).
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


@dataclass(frozen=True)
class WeightRef:
    """One ember weight: its name, float shape and how to load it (lazily)."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]

    def transposed(self) -> "WeightRef":
        """The 2-D weight as ``[in, out]``: what ONNX ``MatMul`` wants for a ``[out, in]`` Linear weight."""
        load = self.load
        return WeightRef(self.name, self.shape[::-1], lambda: np.ascontiguousarray(load().T))


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
                    self._refs[name] = WeightRef(name, tuple(source.shape(key)),
                                                 self._loader(key, match, rule.transform))
                break
            else:
                self._refs.setdefault(key, WeightRef(key, tuple(source.shape(key)),
                                                     self._loader(key, None, None)))

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
