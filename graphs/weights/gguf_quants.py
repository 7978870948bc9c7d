"""ember's own numpy dequantization of GGML tensor data (the block formats GGUF files store).

A quantized GGML tensor is a sequence of fixed-size *blocks*, each holding ``block_size`` consecutive
weights of one row (rows are ggml's ``ne[0]``, the last PyTorch dimension, so a row never shares a
block with another). All multi-byte fields are little-endian; ``f16`` is an IEEE half.

Every kernel here works on a whole ``[n_blocks, bytes_per_block]`` uint8 matrix at once: the fields
are column slices viewed as their dtype (no per-block Python), the results are written into a
preallocated float32 output, and the work is done in cache-sized chunks of blocks so that the few
uint8/float32 temporaries stay small. No float64 is ever created.

The arithmetic follows ggml's reference dequantization (``dequantize_row_*`` in ggml-quants.c) in
float32 and in the same order of operations, so the results are bit-identical to it (and to the
``gguf`` python package).
"""
from __future__ import annotations

from math import prod

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

__all__ = ["SUPPORTED_TYPES", "block_info", "dequantize"]

_CHUNK_WEIGHTS = 1 << 18  # weights dequantized per step: 1 MiB of float32 output (about L2)


def block_info(qtype) -> tuple[int, int]:
    """``(weights per block, bytes per block)`` of a GGML type; ``(1, itemsize)`` for plain types."""
    qtype = T(qtype)
    return GGML_QUANT_SIZES[qtype]


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The f16 field at byte ``offset`` of every block, as a float32 column ``[n_blocks, 1]``."""
    return blocks[:, offset:offset + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Unpack packed bytes ``qs [n, ..., k]`` into ``out [n, ..., 2, k]``: low nibbles, then high nibbles.

    Two plain 2-D passes over a contiguous copy are about twice as fast as one broadcast shift.
    """
    qs = np.ascontiguousarray(qs)
    out[..., 0, :] = qs & np.uint8(0x0F)
    out[..., 1, :] = qs >> np.uint8(4)
    return out


# --- 32-weight block formats ----------------------------------------------------------------

def _q8_0(b: np.ndarray, out: np.ndarray) -> None:
    """Q8_0, 34 bytes / 32 weights: ``d: f16``, ``qs: int8[32]``.  ``w[i] = d * qs[i]``."""
    out[...] = b[:, 2:].view(np.int8)
    out *= _f16(b, 0)


def _q4_0(b: np.ndarray, out: np.ndarray) -> None:
    """Q4_0, 18 bytes / 32 weights: ``d: f16``, ``qs: u8[16]``.

    ``qs[i]`` packs weight ``i`` (low nibble) and weight ``i + 16`` (high nibble);
    ``w = d * (q - 8)``.
    """
    _nibbles(b[:, 2:18], out.reshape(-1, 2, 16))
    out -= np.float32(8)
    out *= _f16(b, 0)


def _q4_1(b: np.ndarray, out: np.ndarray) -> None:
    """Q4_1, 20 bytes / 32 weights: ``d: f16``, ``m: f16``, ``qs: u8[16]`` (nibbles as in Q4_0).

    ``w = d * q + m``.
    """
    _nibbles(b[:, 4:20], out.reshape(-1, 2, 16))
    out *= _f16(b, 0)
    out += _f16(b, 2)


def _q5(qh: np.ndarray, qs: np.ndarray, out: np.ndarray) -> None:
    """The 5-bit values of a Q5_0/Q5_1 block: nibbles as in Q4_0, plus the fifth bit of weight ``j``
    in bit ``j`` of the little-endian u32 ``qh``."""
    q = _nibbles(qs, np.empty((qs.shape[0], 2, 16), np.uint8)).reshape(-1, 32)
    q |= np.unpackbits(qh, axis=1, bitorder="little") << np.uint8(4)
    out[...] = q


def _q5_0(b: np.ndarray, out: np.ndarray) -> None:
    """Q5_0, 22 bytes / 32 weights: ``d: f16``, ``qh: u32``, ``qs: u8[16]``.  ``w = d * (q - 16)``."""
    _q5(b[:, 2:6], b[:, 6:22], out)
    out -= np.float32(16)
    out *= _f16(b, 0)


def _q5_1(b: np.ndarray, out: np.ndarray) -> None:
    """Q5_1, 24 bytes / 32 weights: ``d: f16``, ``m: f16``, ``qh: u32``, ``qs: u8[16]``.

    ``w = d * q + m``.
    """
    _q5(b[:, 4:8], b[:, 8:24], out)
    out *= _f16(b, 0)
    out += _f16(b, 2)


# --- 256-weight "K" super-block formats -----------------------------------------------------

def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K/Q5_K's 12 scale bytes into eight 6-bit scales and eight 6-bit mins (uint8 ``[n, 8]``).

    Sub-blocks 0-3: ``sc = s[j] & 63``, ``min = s[j+4] & 63``.  Sub-blocks 4-7 take their low four bits
    from ``s[j+4]`` (scale: low nibble, min: high nibble) and their top two bits from the top two bits
    of ``s[j-4]`` (scale) / ``s[j]`` (min).
    """
    a, m, h = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & np.uint8(63), (h & np.uint8(0x0F)) | ((a >> np.uint8(6)) << np.uint8(4))], axis=1)
    mn = np.concatenate([m & np.uint8(63), (h >> np.uint8(4)) | ((m >> np.uint8(6)) << np.uint8(4))], axis=1)
    return sc, mn


def _k_apply(b: np.ndarray, out: np.ndarray) -> None:
    """``w = (d * sc) * q - (dmin * min)`` per 32-weight sub-block (d, dmin: f16 at bytes 0 and 2,
    scales at bytes 4-15); ``out`` already holds ``q``."""
    sc, mn = _k_scale_min(b[:, 4:16])
    o = out.reshape(-1, 8, 32)
    o *= (_f16(b, 0) * sc)[:, :, None]
    o -= (_f16(b, 2) * mn)[:, :, None]


def _q4_k(b: np.ndarray, out: np.ndarray) -> None:
    """Q4_K, 144 bytes / 256 weights: ``d: f16``, ``dmin: f16``, ``scales: u8[12]``, ``qs: u8[128]``.

    Eight sub-blocks of 32 with 6-bit scale and min (see :func:`_k_scale_min`).  ``qs`` is four 32-byte
    groups; group ``g`` holds sub-block ``2g`` in its low nibbles and ``2g + 1`` in its high nibbles.
    """
    _nibbles(b[:, 16:144].reshape(-1, 4, 32), out.reshape(-1, 4, 2, 32))
    _k_apply(b, out)


_BIT_SHIFTS = np.arange(8, dtype=np.uint8)


def _q5_k(b: np.ndarray, out: np.ndarray) -> None:
    """Q5_K, 176 bytes / 256 weights: ``d: f16``, ``dmin: f16``, ``scales: u8[12]``, ``qh: u8[32]``,
    ``qs: u8[128]``.

    Low four bits as in Q4_K; the fifth bit of weight ``l`` of sub-block ``s`` is bit ``s`` of ``qh[l]``.
    """
    q = _nibbles(b[:, 48:176].reshape(-1, 4, 32), np.empty((b.shape[0], 4, 2, 32), np.uint8)).reshape(-1, 8, 32)
    q |= ((b[:, None, 16:48] >> _BIT_SHIFTS[:, None]) & np.uint8(1)) << np.uint8(4)
    out.reshape(-1, 8, 32)[...] = q
    _k_apply(b, out)


_CRUMB_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


def _q6_k(b: np.ndarray, out: np.ndarray) -> None:
    """Q6_K, 210 bytes / 256 weights: ``ql: u8[128]``, ``qh: u8[64]``, ``scales: i8[16]``, ``d: f16``.

    Two halves of 128 weights; half ``h`` uses ``ql[64h:64h+64]`` and ``qh[32h:32h+32]``.  For
    ``l < 32`` its weights ``l, l+32, l+64, l+96`` take their low four bits from the low nibble of
    ``ql[l]``, the low nibble of ``ql[l+32]``, the high nibble of ``ql[l]``, the high nibble of
    ``ql[l+32]``, and their top two bits from bits 0-1, 2-3, 4-5, 6-7 of ``qh[l]``.
    ``w = d * scales[k // 16] * (q - 32)`` for weight ``k`` of the super-block.
    """
    q = _nibbles(b[:, 0:128].reshape(-1, 2, 64), np.empty((b.shape[0], 2, 2, 64), np.uint8)).reshape(-1, 2, 4, 32)
    q |= ((b[:, 128:192].reshape(-1, 2, 1, 32) >> _CRUMB_SHIFTS[:, None]) & np.uint8(3)) << np.uint8(4)
    o = out.reshape(-1, 16, 16)
    o[...] = q.reshape(-1, 16, 16)
    o -= np.float32(32)
    o *= (_f16(b, 208) * b[:, 192:208].view(np.int8))[:, :, None]


_KERNELS = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
    T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}
_PLAIN = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16, T.F64: np.float64}

#: The GGML types :func:`dequantize` understands.
SUPPORTED_TYPES: tuple[T, ...] = (T.F32, T.F16, T.BF16, T.F64, *_KERNELS)


def _unsupported(qtype) -> ValueError:
    names = ", ".join(t.name for t in SUPPORTED_TYPES)
    name = qtype.name if isinstance(qtype, T) else repr(qtype)
    return ValueError(f"GGML tensor type {name} is not supported by ember's dequantizer (supported: {names})")


def dequantize(data: np.ndarray, qtype, shape) -> np.ndarray:
    """Decode GGML tensor ``data`` of type ``qtype`` into a float32 array of ``shape``.

    ``data`` is the tensor's storage as ``gguf.GGUFReader`` exposes it: for quantized types the raw
    blocks as uint8 (``[rows, bytes_per_row]`` or flat), for F32/F16/F64 the typed values, for BF16
    the raw bytes (or uint16). ``shape`` is the logical shape in PyTorch order (ggml's ``ne``
    reversed), so blocks run along its last dimension. Raises ``ValueError`` for an unsupported type
    or for data whose size does not match ``shape``.
    """
    try:
        qtype = T(qtype)
    except ValueError:
        raise _unsupported(qtype) from None
    shape = tuple(int(s) for s in shape)
    n = prod(shape)
    data = np.asarray(data)
    if qtype in _PLAIN:
        flat = np.ascontiguousarray(data).reshape(-1).view(_PLAIN[qtype])
        if flat.size != n:
            raise ValueError(f"{qtype.name} data has {flat.size} values, shape {shape} needs {n}")
        if qtype == T.BF16:  # bf16 is the top half of a float32
            return (flat.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)
        return flat.astype(np.float32).reshape(shape)  # always a fresh array (data may be a memmap)
    kernel = _KERNELS.get(qtype)
    if kernel is None:
        raise _unsupported(qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % block_size:
        raise ValueError(f"{qtype.name}: row length {shape[-1]} of shape {shape} is not a multiple "
                         f"of the block size {block_size}")
    n_blocks = n // block_size
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if raw.size != n_blocks * type_size:
        raise ValueError(f"{qtype.name} data has {raw.size} bytes, shape {shape} needs "
                         f"{n_blocks * type_size} ({n_blocks} blocks of {type_size})")
    blocks = raw.reshape(n_blocks, type_size)
    out = np.empty((n_blocks, block_size), dtype=np.float32)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    for start in range(0, n_blocks, step):
        kernel(blocks[start:start + step], out[start:start + step])
    return out.reshape(shape)
