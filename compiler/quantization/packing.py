"""Bit packing of MatMulNBits codes and zero points (low-first: element ``2j`` in the low nibble of byte ``j``)."""
from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_ZERO_POINT", "pack_codes", "pack_onnx_4bit", "pack_zero_points", "unpack_codes",
           "unpack_zero_points"]

#: The zero point MatMulNBits assumes when the input is absent.
DEFAULT_ZERO_POINT = {4: 8, 8: 128}


def _check_bits(bits: int) -> None:
    if bits not in DEFAULT_ZERO_POINT:
        raise ValueError(f"bits must be 4 or 8, not {bits}")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes ``[..., L]`` (values < 2**bits, L even for 4-bit) -> bytes ``[..., L * bits // 8]``."""
    _check_bits(bits)
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    return codes[..., 0::2] | (codes[..., 1::2] << np.uint8(4))


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_codes`: bytes ``[..., B]`` -> codes ``[..., B * 8 // bits]``."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed
    out = np.empty((*packed.shape, 2), np.uint8)
    out[..., 0] = packed & np.uint8(0x0F)
    out[..., 1] = packed >> np.uint8(4)
    return out.reshape(*packed.shape[:-1], -1)


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """uint8 zero points ``[n, k_blocks]`` -> the flat ``zero_points`` input.

    8-bit: ``[n * k_blocks]``. 4-bit: ``[n * ceil(k_blocks / 2)]``, each row padded to whole bytes,
    block ``2i`` in the low nibble.
    """
    _check_bits(bits)
    zp = np.asarray(zp, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(zp).reshape(-1)
    n, kb = zp.shape
    if kb % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    return pack_codes(zp, 4).reshape(-1)


def unpack_zero_points(zp: np.ndarray | None, bits: int, n: int, k_blocks: int) -> np.ndarray:
    """Any ``zero_points`` input (None, packed uint8, or float) as float32 ``[n, k_blocks]``."""
    _check_bits(bits)
    if zp is None:
        return np.full((n, k_blocks), DEFAULT_ZERO_POINT[bits], np.float32)
    if zp.dtype != np.uint8:
        return np.asarray(zp, np.float32).reshape(n, k_blocks)
    if bits == 8:
        return zp.reshape(n, k_blocks).astype(np.float32)
    return unpack_codes(zp.reshape(n, -1), 4)[:, :k_blocks].astype(np.float32)


def pack_onnx_4bit(values: np.ndarray) -> np.ndarray:
    """Integers in [-8, 15] of any shape -> the raw bytes of an ONNX INT4/UINT4 tensor of that shape.

    ONNX packs 4-bit tensors over the flattened (row-major) elements, element ``2j`` in the low nibble of
    byte ``j``, an odd count padded with a zero nibble; a negative value is stored as its two's complement
    nibble (``-8`` -> ``0x8``). Returns uint8 ``[ceil(size / 2)]``.
    """
    flat = (np.asarray(values).reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return pack_codes(flat, 4)
