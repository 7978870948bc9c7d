"""Rotary position embedding: the cos/sin tables, with the frequency scalings transformers applies.

The tables are ``[max_positions, rotary_dim / 2]`` constants that the attention op indexes by position
(what ``GroupQueryAttention``'s ``cos_cache``/``sin_cache`` take), so every scaling that only changes the
frequencies (``linear``, ``llama3``) costs nothing at run time. Frequencies and angles are computed in
float32 the way transformers does, so positions match it bit for bit as far as numpy allows.

``longrope`` (Phi-3's 128k models) is the exception that bounds the tables: transformers picks its short
factors while the sequence is at most ``original_max_position_embeddings`` long and its long factors, for every
position, once it is longer (recomputing the whole KV cache at the switch). A table indexed by position under a
KV cache cannot follow that switch, so a longrope table stops at ``original_max_position_embeddings``
(:attr:`RopeScaling.max_positions`), where it is transformers' exactly: short factors, cos/sin times the
attention factor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ..ir import ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
_REQUIRED_PARAMS = {"default": (), "linear": ("factor",),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                    "longrope": ("original_max_position_embeddings",)}


@dataclass(frozen=True)
class RopeScaling:
    """HF ``rope_parameters`` / ``rope_scaling``: the type and its parameters."""

    rope_type: str = "default"
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf(cls, scaling: dict[str, Any] | None, max_position_embeddings: int | None = None) -> "RopeScaling":
        """``max_position_embeddings``: the model's (longrope without a ``factor`` derives it from the two lengths,
        as transformers does)."""
        if not scaling:
            return cls()
        if not isinstance(scaling, dict):
            raise ValueError(f"rope scaling must be an object, not {scaling!r:.80}")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope scaling {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        params = {k: v for k, v in scaling.items() if k not in ("rope_type", "type", "rope_theta")}
        for name in _REQUIRED_PARAMS[rope_type]:  # each a positive number (the tables divide by them)
            value = params.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"rope scaling {rope_type!r} needs {name} as a positive number, not {value!r}")
        if rope_type == "llama3" and params["low_freq_factor"] == params["high_freq_factor"]:
            raise ValueError("rope scaling 'llama3' needs different low_freq_factor and high_freq_factor")
        if rope_type == "longrope":
            params["attention_factor"] = _longrope_attention_factor(params, max_position_embeddings)
        return cls(rope_type, params)

    @property
    def attention_factor(self) -> float:
        """What cos and sin are multiplied by (longrope's attention scaling; 1 for the others)."""
        return float(self.params.get("attention_factor", 1.0)) if self.rope_type == "longrope" else 1.0

    @property
    def max_positions(self) -> int | None:
        """The positions whose table does not depend on the sequence's length (None: every position); see the
        module docstring for longrope's."""
        return int(self.params["original_max_position_embeddings"]) if self.rope_type == "longrope" else None

    def check_rotary_dim(self, rotary_dim: int) -> None:
        """longrope's ``short_factor`` has one factor per rotary pair (a ValueError naming the field otherwise;
        ``long_factor`` is never used: see the module docstring)."""
        if self.rope_type != "longrope":
            return
        factors = self.params.get("short_factor")
        if not isinstance(factors, (list, tuple)) or len(factors) != rotary_dim // 2 or not all(
                _positive(f) for f in factors):
            raise ValueError(f"rope scaling 'longrope' needs short_factor as {rotary_dim // 2} positive numbers (one "
                             f"per rotary pair of {rotary_dim} dimensions), not {factors!r:.80}")


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _longrope_attention_factor(params: dict[str, Any], max_position_embeddings: int | None) -> float:
    """transformers' ``_compute_longrope_parameters``: ``attention_factor`` as given, else from ``factor`` (itself
    ``max_position_embeddings / original_max_position_embeddings`` when absent)."""
    original = params["original_max_position_embeddings"]
    if original < 2:  # its logarithm divides the factor
        raise ValueError(f"rope scaling 'longrope' needs original_max_position_embeddings of at least 2, "
                         f"not {original}")
    for name in ("attention_factor", "factor"):
        if params.get(name) is not None and not _positive(params[name]):
            raise ValueError(f"rope scaling 'longrope' needs {name} as a positive number, not {params[name]!r}")
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = params.get("factor")
    if factor is None:
        if max_position_embeddings is None:
            raise ValueError("rope scaling 'longrope' without factor needs the model's max_position_embeddings")
        factor = max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def inverse_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Per-pair inverse frequencies (float32), after the scaling."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling.params["factor"])
    elif scaling.rope_type == "longrope":  # transformers: 1 / (short_factor * theta ** exponents)
        scaling.check_rotary_dim(rotary_dim)
        short = np.asarray(scaling.params["short_factor"], dtype=np.float32)
        inv_freq = (np.float32(1.0) / (short * np.power(np.float32(theta), exponents))).astype(np.float32)
    elif scaling.rope_type == "llama3":
        p = scaling.params
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


class RotaryEmbedding:
    """cos/sin tables for positions ``0 .. max_positions - 1``."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, scaling: RopeScaling | None = None,
                 partial_rotary_factor: float = 1.0, interleaved: bool = False):
        self.scaling = scaling or RopeScaling()
        if self.scaling.max_positions is not None and max_positions > self.scaling.max_positions:
            raise ValueError(f"rope scaling {self.scaling.rope_type!r}: a table of {max_positions} positions is "
                             f"past the {self.scaling.max_positions} it is exact for")
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        self.theta = theta
        self.max_positions = max_positions
        self.interleaved = interleaved
        self._values: tuple[ir.Value, ir.Value] | None = None

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        inv_freq = inverse_frequencies(self.rotary_dim, self.theta, self.scaling)
        angles = np.arange(self.max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        factor = self.scaling.attention_factor
        if factor != 1.0:  # transformers multiplies both by it, in float32
            cos, sin = cos * np.float32(factor), sin * np.float32(factor)
        return cos, sin

    def __call__(self) -> tuple[ir.Value, ir.Value]:
        """The tables as constants of the active graph (made once, shared by every layer)."""
        if self._values is None:
            cos, sin = self.tables()
            self._values = (ops.constant(cos, name="rotary.cos_cache"), ops.constant(sin, name="rotary.sin_cache"))
        return self._values
