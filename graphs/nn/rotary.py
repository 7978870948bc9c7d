"""Rotary position embedding: the cos/sin tables, with the frequency scalings transformers applies.

The tables are ``[max_positions, rotary_dim / 2]`` constants that the attention op indexes by position
(what ``GroupQueryAttention``'s ``cos_cache``/``sin_cache`` take), so every scaling that only changes the
frequencies (``linear``, ``llama3``) costs nothing at run time. Frequencies and angles are computed in
float32 the way transformers does, so positions match it bit for bit as far as numpy allows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ..ir import ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED_PARAMS = {"default": (), "linear": ("factor",),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass(frozen=True)
class RopeScaling:
    """HF ``rope_parameters`` / ``rope_scaling``: the type and its parameters."""

    rope_type: str = "default"
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf(cls, scaling: dict[str, Any] | None) -> "RopeScaling":
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
        return cls(rope_type, params)


def inverse_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Per-pair inverse frequencies (float32), after the scaling."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling.params["factor"])
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
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        self.theta = theta
        self.max_positions = max_positions
        self.scaling = scaling or RopeScaling()
        self.interleaved = interleaved
        self._values: tuple[ir.Value, ir.Value] | None = None

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        inv_freq = inverse_frequencies(self.rotary_dim, self.theta, self.scaling)
        angles = np.arange(self.max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def __call__(self) -> tuple[ir.Value, ir.Value]:
        """The tables as constants of the active graph (made once, shared by every layer)."""
        if self._values is None:
            cos, sin = self.tables()
            self._values = (ops.constant(cos, name="rotary.cos_cache"), ops.constant(sin, name="rotary.sin_cache"))
        return self._values
