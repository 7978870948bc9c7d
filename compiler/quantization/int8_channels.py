"""Symmetric int8 weights with one scale per output channel (the ``w8a8`` encoding's weights).

``W [K, N] ~= codes [K, N] * scales [N]``, ``scales = max|W[:, n]| / 127``, codes rounded to nearest and
clipped to [-127, 127] (never -128, so negating a code cannot overflow). A column of zeros gets scale 1.
"""
from __future__ import annotations

import numpy as np


def quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes int8 [K, N], scales float32 [N])`` for a float ``weight [K, N]`` (a MatMul's right operand)."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] weight, got shape {weight.shape}")
    weight = np.asarray(weight, dtype=np.float32)
    scales = np.abs(weight).max(axis=0) / 127.0
    scales[scales == 0] = 1.0
    codes = np.clip(np.rint(weight / scales), -127, 127).astype(np.int8)
    return codes, scales.astype(np.float32)


def dequantize_per_channel(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scales[None, :]
