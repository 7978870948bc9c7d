"""Bytes a weight matrix takes in each encoding, as the compiler stores it (for sizing before compiling).

The quantized encodings store matrices as onnxruntime's ``MatMulNBits`` blocks of 32 along a row: the packed
codes, one float32 scale per block, and for the asymmetric encodings one 4-bit zero point per block (what
``compiler/quantization/matmul_nbits.py`` writes); ``w8a8`` keeps int8 codes with one float32 scale per output
row. Everything else (norms, biases, float tables) stays float32.
"""
from __future__ import annotations

BLOCK = 32
FLOAT32 = 4

#: encoding -> bytes per block of 32 weights of a quantized matrix (codes + scale [+ zero point]).
_BLOCK_BYTES = {"q8_0": 32 + 4, "q4_0": 16 + 4, "q4_1": 16 + 4 + 0.5, "q4_k": 16 + 4 + 0.5}


def matrix_bytes(rows: int, cols: int, encoding: str) -> int:
    """Bytes of one ``[rows, cols]`` weight matrix (``cols``: the input dimension, along which blocks run)."""
    if encoding in _BLOCK_BYTES:
        blocks = -(-cols // BLOCK)
        return int(rows * blocks * _BLOCK_BYTES[encoding])
    if encoding == "w8a8":
        return rows * cols + rows * FLOAT32
    return rows * cols * FLOAT32
