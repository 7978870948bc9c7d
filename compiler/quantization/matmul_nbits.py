"""Weights packed for onnxruntime's ``com.microsoft.MatMulNBits`` (weight-only blockwise quantization).

``MatMulNBits(A, B, scales[, zero_points])`` computes ``Y = A @ W.T`` for a logical float weight
``W [N, K]`` (a Linear's ``[out, in]`` checkpoint weight; the transpose of an ONNX ``MatMul``'s
``[K, N]`` right operand). ``W`` is cut along K into ``k_blocks = ceil(K / block_size)`` blocks per
row; the last block is padded. Inputs, as this module produces them:

* ``B`` uint8 ``[N, k_blocks, block_size * bits // 8]``: the codes, packed *low-first* along K
  (4-bit: byte ``j`` holds element ``2j`` in its low nibble, ``2j + 1`` in its high nibble; checked
  against onnxruntime 1.31 by the tests).
* ``scales`` ``[N * k_blocks]`` of A's float type (float32 here).
* ``zero_points``, optional: uint8 (4-bit: two per byte, block ``2i`` in the low nibble,
  ``[N * ceil(k_blocks / 2)]``; 8-bit: ``[N * k_blocks]``) or float of A's type ``[N * k_blocks]``
  (onnxruntime's CPU kernel accepts float zero points only for 2 and 4 bits). Absent: 8 for 4-bit,
  128 for 8-bit.

A weight dequantizes as ``w = (q - zp) * scale``; with float zero points onnxruntime's CPU kernel
evaluates it as ``q * scale + (-scale * zp)`` (``DequantizeBlockwise`` in ``matmul_nbits_impl.cc``),
and :func:`dequantize` does the same.

GGUF blocks, repacked as they are by :func:`from_gguf_blocks` (no dequantize/requantize):

* **Q4_0** (``w = d * (q - 8)``): scale ``d``, default zero point 8, codes reordered (GGUF puts
  element ``i`` and ``i + 16`` in one byte). **Exact**: ``(q - 8) * d`` is computed exactly in
  float32 (a 4-bit integer times an f16 mantissa fits in 24 bits), so the dequantized weights are
  bit-identical to ggml's.
* **Q8_0** (``w = d * q``, ``q`` int8): codes stored as ``q + 128``, default zero point 128, scale
  ``d``. **Exact** for the same reason (8 bits times 11 bits).
* **Q4_1** (``w = d * q + m``): scale ``d``, float zero point ``zp ~ -m / d`` (so
  ``(q - zp) * d = q * d + m``), codes reordered as in Q4_0. Exact in real arithmetic. In float32,
  onnxruntime evaluates ``q * d + c`` with ``c = float32(-(d * zp))`` and ggml ``q * d + m``, ``q * d``
  being exact in both: the zero point is picked among the float32 neighbours of ``-m / d`` so that
  ``c == m`` where such a float32 exists, and then the block's weights are **bit-identical** to ggml's
  (90.2% of the 3.3M blocks of SmolLM2-135M's Q4_1 file). Elsewhere ``c`` is the float32 nearest ``m``
  and each weight is **within one float32 ulp** of ``max(|m|, |w|)`` of its block (with scale ``d``
  the weight of code 0 is ``c`` itself, and ggml's quantizer gives every block a code 0, so no zero
  point does better). A block with
  ``d == 0`` means ``w = m`` for all 32 weights, which no ``(q - zp) * 0`` can express; it becomes
  scale ``m``, every code 1, zero point 0: ``1 * m + (-(m * 0)) = m``, **exact** (``m`` is an f16,
  so exactly a float32; the stored codes are rewritten, which is allowed since they carry no
  information when ``d == 0``).

  Cost: onnxruntime cannot prepack B with float zero points, so every call dequantizes all of B
  with a scalar loop and then runs an SGEMM (about 20x slower than float32 at decode, 2-4x at
  prefill, see below).
  :func:`q4_1_split` gives the exact, fast alternative: ``MatMulNBits`` with scale ``d`` and the
  default zero point 8 (``d * (q - 8)``, prepacked, the same kernel as Q4_0) plus ``blocksum(A) @
  mins.T`` with ``mins = m + 8 d``, a ``[M, k_blocks] x [k_blocks, N]`` MatMul
  (:func:`.onnx_models.q4_1_split_model`); the graph rewrite is a compiler pass's job. An explicit
  zero-point input (``d * q`` with uint8 zero point 0, the ``exact_rows=True`` form) costs
  MatMulNBits 10-25 % more at decode (onnxruntime 1.31, M = 1, accuracy level 4: 3072 x 576
  101 -> 126 µs, 576 x 1536 58 -> 73 µs, one thread), so products take the default form; ``m + 8 d``
  is rounded once to float32 (exact unless the exponents of ``m`` and ``8 d`` are far apart), so a
  product stays within float32 rounding of ggml's. A table *looked up* (GatherBlockQuantized) takes
  the zero-point-0 form, whose rows are ggml's bit for bit.

Round-to-nearest quantization of float weights (:func:`quantize_rtn`):

* symmetric (default zero point, no zero-point input): per block the element of largest magnitude
  ``x_max`` (with its sign) maps to code 0, i.e. ``scale = x_max / -2**(bits-1)`` (ggml's Q4_0/Q8_0
  choice: it uses all 16 / 256 codes; the scale may be negative); codes
  ``clip(rint(x / scale) + zp, 0, 2**bits - 1)``. Error ``<= |scale| / 2`` except an element equal
  to about ``-x_max`` that clips to the top code (``<= |scale|``).
* asymmetric (uint8 zero points): ``lo = min(x, 0)``, ``hi = max(x, 0)``,
  ``scale = (hi - lo) / (2**bits - 1)``, ``zp = clip(rint(-lo / scale))``; error ``<= scale``
  (``scale / 2`` from rounding the code, up to another ``scale / 2`` from the rounded zero point
  at the clipped ends).

Padded elements of the last block (K not a multiple of ``block_size``) get the zero-point code (they
dequantize to 0; onnxruntime ignores them anyway) and do not enter the block statistics.

Timings (``python -m ember.tools.bench_matmul_nbits``): onnxruntime 1.31.1 CPU EP,
an AMD EPYC with AVX2/FMA (no AVX-512, no VNNI), block 32, random N(0, 0.02) weights, ``Lx`` =
``accuracy_level`` x, ``4b``/``8b`` = symmetric RTN, ``q41-fzp`` = a repacked Q4_1 weight (float zero
points, level 0), ``q41-split-Lx`` = :func:`q4_1_split` + block-sum MatMul. The 2 cores were shared
with other jobs (load average 3-6) and two-thread wall-clock times swung by 2-20x between runs
(``--threads 2`` prints them); the table is therefore **one thread, CPU time of the calling thread**
(``--cpu-time``; the calling thread runs the whole kernel, so time spent descheduled is not counted),
median of 21, reproducible to about 10-20%. Microseconds per call::

    M = 1 (decode)  fp32  4b-L0  4b-L1  4b-L4   8b-L0   8b-L1  8b-L4  q41-fzp  split-L0  split-L4
    960x576           71    137    136     36    2645    2721     42     1395       181        55
    576x576           47     86     84     24    1165    1091     28      814       116        39
    3072x576         257    422    420    100    9428    9532    118     4652       555       144
    576x1536         117    226    230     53    4053    4193     61     2215       291        78
    49152x576      11473   8937   8795   2559  371617  380465   4468   214749     10985      3403

    M = 64 (prefill)
    960x576         1094   1180   1179   1131    3207    3775   1668     2426      1304      1237
    576x576          663    744    743    737    2319    2401   1079     1540       832       815
    3072x576        3839   3983   4008   3830   14934   15316   5435     8668      4459      4192
    576x1536        2190   2253   2238   2392    6834    7207   3456     5080      2456      2756
    49152x576      62725  66393  64956  63465  430492  422812  92149   249811     75442     68942

Two threads, wall clock, median of 25 in the least loaded run (load average 1.4 at its start; noisy)::

    M = 1           fp32  4b-L0  4b-L1  4b-L4   8b-L0   8b-L1  8b-L4  q41-fzp  split-L0  split-L4
    960x576          101    175    164     47   17352   17403     53     1843       228        69
    576x576           79    108     95     31    1577    1678     37     1004       138        50
    3072x576         497    489    593    117   34956   29224    162    16750       627       179
    576x1536         247    314    254     66   18305   20132     91     9868       372        99
    49152x576      12885  13692  15325   2596  257351  273130   5298   167743     17672      4393

    M = 64
    960x576         1738   1668  13608   1829   19895   19662  14037    18270      1853      2005
    576x576          871    913    943    820    7876    2636   1194     1856      1074       926
    3072x576       19859  18208  19761  19916   57726   49336  19656    38846     18325     20096
    576x1536        2680   2950  17207   3226   27141   36720  20748    21720      3267     17565
    49152x576      74724  68313  73964  65329  300523  298645  83804   213205     71691     77154

Findings. For float32 A, levels 0 and 1 run the same fp32-compute kernel, and level 4 (A quantized to
int8 per block, int32 accumulation) is the fastest for both bit widths: at decode 4-bit L4 is
faster than float32 (2-4.5x) and than 4-bit L0 (3.5-4.3x; L0 is *slower* than float32 except on
the memory-bound output head); at prefill all 4-bit levels are within about 12% of float32. 8-bit has
no fp32-compute kernel on x86 (onnxruntime logs "Falling back to using unpacked compute mode" for
levels 0-3), so levels 0/1 dequantize all of B on every call: 25-37x slower than float32 at decode,
3-7x at prefill; 8-bit L4 is about 2x faster than float32 at decode and about 1.5x slower at prefill.
Errors, ``max|y - y_ref| / max|y_ref|`` with A ~ N(0, 1), worst over the shapes above: against the
product with the exact dequantized weight, L0/L1 1e-6 (float rounding), L4 6.0e-3 (4-bit) and 5.8e-3
(8-bit), q41-split-L4 1.4e-2 (the d*q part is all-positive and cancels against the minima, so A's
int8 rounding shows more); against the float weight the 4-bit weight error dominates (L0 0.109, L4
0.110; Q4_1 0.091) while for 8-bit the two are comparable (L0 6.0e-3, L4 8.5e-3). For a Q4_1
checkpoint, q41-split at L4 is 1.3-3.4x faster than float32 at decode and about as fast at prefill.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from .packing import DEFAULT_ZERO_POINT, pack_codes, pack_zero_points, unpack_codes, unpack_zero_points

__all__ = ["GGUF_TYPES", "PackedWeight", "dequantize", "from_gguf_blocks", "q4_1_split", "q4_k_split",
           "quantize_rtn"]

#: GGUF block types :func:`from_gguf_blocks` repacks.
GGUF_TYPES: tuple[T, ...] = (T.Q4_0, T.Q4_1, T.Q8_0)


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """The inputs of one ``MatMulNBits`` for a logical float weight ``[n, k]``.

    ``b``: uint8 ``[n, k_blocks, block_size * bits // 8]``; ``scales``: float32 ``[n * k_blocks]``;
    ``zero_points``: None (default 8 / 128), uint8 (4-bit: packed two per byte,
    ``[n * ceil(k_blocks / 2)]``; 8-bit: ``[n * k_blocks]``) or float32 ``[n * k_blocks]``.
    """

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    n: int
    k: int

    def __post_init__(self):
        if self.bits not in DEFAULT_ZERO_POINT:
            raise ValueError(f"bits must be 4 or 8, not {self.bits}")
        kb, blob = self.k_blocks, self.block_size * self.bits // 8
        if self.b.dtype != np.uint8 or self.b.shape != (self.n, kb, blob):
            raise ValueError(f"B must be uint8 {(self.n, kb, blob)}, not {self.b.dtype} {self.b.shape}")
        if self.scales.size != self.n * kb:
            raise ValueError(f"scales must have N * k_blocks = {self.n * kb} values, not {self.scales.size}")
        zp = self.zero_points
        if zp is not None:
            packed_size = self.n * (-(-kb // 2) if self.bits == 4 else kb)
            want = packed_size if zp.dtype == np.uint8 else self.n * kb
            if zp.ndim != 1 or zp.size != want:
                raise ValueError(f"{zp.dtype} zero_points must be flat with {want} values, not {zp.shape}")

    @property
    def k_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes of all initializers (B, scales, zero points)."""
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.b.nbytes + self.scales.nbytes + zp

    def attributes(self, accuracy_level: int = 0) -> dict[str, int]:
        """The node attributes ``K``, ``N``, ``bits``, ``block_size``, ``accuracy_level``."""
        return {"K": self.k, "N": self.n, "bits": self.bits, "block_size": self.block_size,
                "accuracy_level": int(accuracy_level)}


# --- GGUF blocks ----------------------------------------------------------------------------

def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16).reshape(-1).astype(np.float32)


def _gguf_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF Q4 ``qs [nb, 16]`` (byte ``i``: element ``i`` low, ``i + 16`` high) -> codes ``[nb, 32]``."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _q4_1_zero_points(d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 zero points for Q4_1 blocks with ``d != 0``: ``(zp, exact)``, ``exact`` per block.

    onnxruntime dequantizes ``q * d + c`` with ``c = -(d * zp)`` rounded to float32, ggml ``q * d + m``
    (``q * d`` is exact in both; every Q4_1 block from ggml's quantizer has a code 0, whose weight is
    ``c`` itself, so nothing short of ``c == m`` reproduces a block bit for bit). Among ``-m / d``
    rounded and its float32 neighbours (4 ulps either side) take the ``zp`` whose ``c`` is nearest
    ``m``: ``c == m`` for about 90% of real blocks, else ``|c - m|`` is one or two ulps of ``m``.
    """
    zp0 = (-m.astype(np.float64) / d.astype(np.float64)).astype(np.float32)
    candidates = [zp0]
    lo = hi = zp0
    for _ in range(4):
        lo = np.nextafter(lo, np.float32(-np.inf))
        hi = np.nextafter(hi, np.float32(np.inf))
        candidates += [lo, hi]
    cand = np.stack(candidates)  # [9, nb]
    err = np.abs((-(d * cand)).astype(np.float64) - m)
    best = err.argmin(axis=0)
    cols = np.arange(d.size)
    return cand[best, cols], err[best, cols] == 0


def _gguf_blocks(raw: np.ndarray, qtype: T, shape) -> tuple[np.ndarray, int, int, int]:
    """``(blocks [n * k_blocks, bytes_per_block], n, k, k_blocks)`` of a block-quantized tensor."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("shape must have at least one dimension")
    k, n = shape[-1], prod(shape[:-1])
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if k % block_size:
        raise ValueError(f"{qtype.name}: row length {k} is not a multiple of {block_size}")
    kb = k // block_size
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if flat.size != n * kb * type_size:
        raise ValueError(f"{qtype.name} data has {flat.size} bytes, shape {shape} needs {n * kb * type_size}")
    return flat.reshape(n * kb, type_size), n, k, kb


def from_gguf_blocks(raw: np.ndarray, qtype, shape) -> PackedWeight:
    """Repack a GGUF Q4_0 / Q4_1 / Q8_0 tensor's raw blocks for ``MatMulNBits`` (``block_size`` 32).

    ``raw``: the tensor's bytes (uint8, flat or ``[rows, bytes_per_row]``, e.g.
    ``GGUFWeights(path)._data(name)``); ``shape``: its PyTorch-order shape ``(N, K)`` (leading
    dimensions are folded into N). The quantized integers and scales are moved, never requantized;
    see the module docstring for which formats are exact.
    """
    qtype = T(qtype)
    if qtype not in GGUF_TYPES:
        raise ValueError(f"from_gguf_blocks supports {', '.join(t.name for t in GGUF_TYPES)}, not {qtype.name}")
    blocks, n, k, kb = _gguf_blocks(raw, qtype, shape)

    if qtype == T.Q8_0:
        codes = blocks[:, 2:] ^ np.uint8(0x80)  # int8 q -> uint8 q + 128
        return PackedWeight(codes.reshape(n, kb, 32), _f16(blocks, 0), None, 8, 32, n, k)

    if qtype == T.Q4_0:
        codes = _gguf_nibbles(blocks[:, 2:18])
        return PackedWeight(pack_codes(codes, 4).reshape(n, kb, 16), _f16(blocks, 0), None, 4, 32, n, k)

    # Q4_1: scale d, float zero point -m/d; a d == 0 block (w = m) becomes scale m, codes 1, zero point 0.
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    codes = _gguf_nibbles(blocks[:, 4:20])
    flat = d == 0
    scales = np.where(flat, m, d).astype(np.float32)
    zp = np.zeros(d.shape, np.float32)
    zp[~flat] = _q4_1_zero_points(d[~flat], m[~flat])[0]
    codes[flat] = 1  # 1 * m + (-m * 0) = m
    return PackedWeight(pack_codes(codes, 4).reshape(n, kb, 16), scales, zp, 4, 32, n, k)


def _split(b: np.ndarray, scales: np.ndarray, mins: np.ndarray, n: int, k: int, kb: int,
           exact_rows: bool) -> tuple[PackedWeight, np.ndarray]:
    """``w = scale * q + min`` per 32-block as MatMulNBits inputs plus minima (see :func:`q4_1_split`)."""
    if exact_rows:
        zp = pack_zero_points(np.zeros((n, kb), np.uint8), 4)
        return PackedWeight(b, scales, zp, 4, 32, n, k), mins.reshape(n, kb)
    shifted = (mins.astype(np.float64) + 8.0 * scales.astype(np.float64)).astype(np.float32)
    return PackedWeight(b, scales, None, 4, 32, n, k), shifted.reshape(n, kb)


def q4_1_split(raw: np.ndarray, shape, exact_rows: bool = False) -> tuple[PackedWeight, np.ndarray]:
    """A GGUF Q4_1 tensor (``w = d * q + m``) as a prepacked MatMulNBits weight plus its block minima.

    Returns ``(packed, mins)``, ``mins`` float32 ``[N, k_blocks]``, with ``A @ W.T = MatMulNBits(A;
    packed) + blocksum(A) @ mins.T``, ``blocksum(A)[..., j] = A[..., 32j:32j+32].sum(-1)``, exact in
    real arithmetic (d == 0 blocks need nothing special). By default ``packed`` has scale ``d`` and no
    zero-point input (MatMulNBits' default 8: ``d * (q - 8)``, its fastest kernel) and ``mins = m + 8 d``
    (rounded once to float32). ``exact_rows``: zero points 0 (``d * q``) and ``mins = m``, so that each
    dequantized weight is ggml's bit for bit (for lookups). See :func:`.onnx_models.q4_1_split_model`.
    """
    blocks, n, k, kb = _gguf_blocks(raw, T.Q4_1, shape)
    b = pack_codes(_gguf_nibbles(blocks[:, 4:20]), 4).reshape(n, kb, 16)
    return _split(b, _f16(blocks, 0), _f16(blocks, 2), n, k, kb, exact_rows)


def q4_k_split(raw: np.ndarray, shape, exact_rows: bool = False) -> tuple[PackedWeight, np.ndarray]:
    """A GGUF Q4_K tensor in the split form of :func:`q4_1_split`.

    Q4_K is a 256-weight super-block of eight 32-weight sub-blocks, each ``w = (d * sc) * q - dmin * mn``
    with 6-bit ``sc`` / ``mn`` and f16 ``d`` / ``dmin``: per 32-block that is Q4_1's form with scale
    ``d * sc`` and minimum ``-(dmin * mn)``, both exact in float32 (an 11-bit mantissa times a 6-bit
    integer). With ``exact_rows`` (uint8 zero point 0) ``packed`` plus ``mins`` reproduce ggml's weights
    bit for bit; by default (no zero-point input) the minima absorb ``8 * d * sc``, as for Q4_1.
    """
    from ember.graphs.weights.gguf_quants import _k_scale_min

    shape = tuple(int(s) for s in shape)
    k, n = shape[-1], prod(shape[:-1])
    block_size, type_size = GGML_QUANT_SIZES[T.Q4_K]
    if k % block_size:
        raise ValueError(f"Q4_K: row length {k} is not a multiple of {block_size}")
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    supers = k // block_size
    if flat.size != n * supers * type_size:
        raise ValueError(f"Q4_K data has {flat.size} bytes, shape {shape} needs {n * supers * type_size}")
    blocks = flat.reshape(n * supers, type_size)
    sc, mn = _k_scale_min(blocks[:, 4:16])  # [n * supers, 8] each
    scales = (_f16(blocks, 0)[:, None] * sc).astype(np.float32)
    mins = -(_f16(blocks, 2)[:, None] * mn).astype(np.float32)
    qs = blocks[:, 16:144].reshape(-1, 4, 32)  # group g: sub-block 2g low nibbles, 2g + 1 high nibbles
    codes = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=2).reshape(n, supers * 8, 32)
    kb = supers * 8
    b = pack_codes(codes.reshape(n * kb, 32), 4).reshape(n, kb, 16)
    return _split(b, scales.reshape(-1), mins.reshape(-1), n, k, kb, exact_rows)


# --- round-to-nearest quantization ----------------------------------------------------------

def quantize_rtn(weight: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = True) -> PackedWeight:
    """Blockwise round-to-nearest quantization of a float weight ``[N, K]`` (a Linear's ``[out, in]``).

    ``symmetric``: default zero point (8 / 128), no zero-point input; else uint8 zero points (packed
    two per byte for 4-bit). ``block_size``: a power of two >= 16 (MatMulNBits' requirement); K need
    not be a multiple of it.
    """
    if bits not in DEFAULT_ZERO_POINT:
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, not {block_size}")
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K], not {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weight has non-finite values")
    n, k = w.shape
    kb = -(-k // block_size)
    pad = kb * block_size - k
    # Edge padding repeats a real element of the last block: block statistics stay those of the real data.
    x = (np.pad(w, ((0, 0), (0, pad)), mode="edge") if pad else w).reshape(n, kb, block_size)
    qmax = (1 << bits) - 1

    if symmetric:
        zp_code = DEFAULT_ZERO_POINT[bits]
        idx = np.abs(x).argmax(axis=-1)[..., None]
        scale = np.take_along_axis(x, idx, axis=-1)[..., 0] / np.float32(-zp_code)
        zp = np.full((n, kb), zp_code, np.float32)
    else:
        lo = np.minimum(x.min(axis=-1), 0)
        hi = np.maximum(x.max(axis=-1), 0)
        scale = (hi - lo) / np.float32(qmax)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.clip(np.rint(np.where(scale != 0, -lo / scale, 0)), 0, qmax).astype(np.float32)
    scale = scale.astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint(x * inv[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    if pad:
        codes[:, -1, block_size - pad:] = zp[:, -1:].astype(np.uint8)
    zero_points = None if symmetric else pack_zero_points(zp.astype(np.uint8), bits)
    return PackedWeight(pack_codes(codes, bits), scale.reshape(-1), zero_points, bits, block_size, n, k)


# --- reference dequantization ---------------------------------------------------------------

def dequantize(packed: PackedWeight) -> np.ndarray:
    """The float32 ``[N, K]`` weight ``MatMulNBits`` multiplies with (numpy reference, for tests).

    Integer zero points: ``(q - zp) * scale`` (``q - zp`` is exact). Float zero points:
    ``q * scale + (-scale * zp)``, onnxruntime's CPU order of operations.
    """
    n, kb, bs = packed.n, packed.k_blocks, packed.block_size
    q = unpack_codes(packed.b, packed.bits).reshape(n, kb, bs).astype(np.float32)
    scale = packed.scales.astype(np.float32).reshape(n, kb, 1)
    zp = unpack_zero_points(packed.zero_points, packed.bits, packed.n, packed.k_blocks)[..., None]
    if packed.zero_points is not None and packed.zero_points.dtype != np.uint8:
        w = q * scale + (-scale * zp)
    else:
        w = (q - zp) * scale
    return w.reshape(n, kb * bs)[:, :packed.k]
