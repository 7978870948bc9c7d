"""Weight-only block quantization in standard ONNX: blocked ``DequantizeLinear`` feeding the ``MatMul``.

The form for targets that take standard ONNX rather than onnxruntime's contrib ops (TensorRT and others):
a float ``MatMul(x, W)`` with a constant ``W [K, N]``, and the tied output head ``Gemm(x, E, transB=1)``,
become ``MatMul(x, DequantizeLinear(q, scale[, zero_point], axis=0, block_size=32))`` (opset >= 21).

Layout, and why: ``q [K, N]`` (the MatMul's own orientation), blocks of 32 along K (``axis=0``),
``scale [ceil(K / 32), N]``.

* onnxruntime 1.31's CPU EP runs it for int4/uint4/int8/uint8, with and without zero points, and K need
  not be a multiple of 32: ONNX's blocked quantization lets the last block be short (``ceil``), so unlike
  MatMulNBits' B nothing is padded (1.32 too, K below 32 and odd N included, fused or not:
  ``tests/compiler/quantization/test_any_shape.py``). Its graph optimizer (``DQMatMulToMatMulNBits``,
  level EXTENDED and up, so by default) fuses exactly this pattern -- a constant blocked DQ on axis 0
  straight into a MatMul -- into ``MatMulNBits`` for all four types, at ``accuracy_level`` = the session option
  ``session.qdq_matmulnbits_accuracy_level`` (default 4): the Q/DQ model runs at MatMulNBits speed,
  with the same results (bit for bit at equal accuracy levels, checked by the tests). Unfused (level
  BASIC), DQ dequantizes the whole weight on every call. One thread, CPU time, median of 31, a 576 x 1536
  (N x K) weight, microseconds per call (float32 MatMul: 158 at M = 1, 2145 at M = 64)::

                  MatMulNBits L0 / L4    Q/DQ fused L0 / L4     Q/DQ unfused
      4-bit M=1         363 / 82             358 / 83              2717
      8-bit M=1        6748 / 96            6727 / 94               502
      4-bit M=64       2562 / 2685          2699 / 2556            4519
      8-bit M=64       9170 / 4130          9011 / 3995            3524

  Whole SmolLM2-135M (4-bit RTN, ort-cpu lowering, this pass instead of ``quantize_matmuls``): same file
  size (199.8 MB, the embedding table stays float), the same logits, 149 MB RSS after loading instead of
  130 MB (the fusion transposes the codes at load time).
  The other layouts are not fused (measured: ``[N, K]`` + ``axis=1`` into ``Gemm(transB=1)`` stays DQ +
  Gemm, with a Transpose it becomes DQ + FusedMatMul), so they would dequantize the whole weight on
  every call. That is why the tied head becomes a MatMul over its own transposed codes.
* TensorRT takes blocked DQ on a constant weight for INT4 weight-only quantization (INT8 too in recent
  versions) with the blocks along one of the last two axes; it supports **symmetric quantization only**
  (zero point absent or all zero) and **strictly positive scales**.

Codes: exactly the packer's (the same :class:`~ember.compiler.quantization.PackedWeight` MatMulNBits
would get). Default zero point (8 / 128) -> signed INT4 / INT8 codes ``q - 8`` / ``q - 128`` and no
zero-point input (the form TensorRT wants); uint8 zero points -> UINT4 / UINT8 codes and a zero-point
input ``[ceil(K / 32), N]``. Float zero points (GGUF Q4_1) and the Q4_1 split's block minima have no DQ
form, nor has a graph below opset 21 (:func:`dequantize_linear_rejection`): such a weight stays float32,
recorded in the lowering record. :func:`~ember.compiler.quantization.quantize_rtn`'s symmetric
scales are signed (ggml's choice: the largest-magnitude element maps to code 0), which onnxruntime runs
but TensorRT rejects: ``rtn_packer(bits, positive_scales=True)`` quantizes to ``[-7, 7]`` /
``[-127, 127]`` with positive scales instead (the same codes serve MatMulNBits).

Packers: ``pack(weight_value, transposed)`` returns the PackedWeight of the logical ``[N, K]`` weight
(``transposed``: the value already is ``[N, K]``, a ``Gemm`` with ``transB=1``), an object with
``.packed`` (and ``.mins``), e.g. ``quantize_matmuls.QuantizedWeight``, or None to leave the weight
float. The graph needs the packed form's type before anything is packed: ``plan(weight_value,
transposed) -> PackSpec | None`` (an argument, or the packer's ``spec`` method, as on :func:`rtn_packer`)
gives it, and the packer then runs only when the model is written (lazy tensors). Without a plan the
packer runs during the pass.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeGuard, runtime_checkable

import numpy as np
import onnx_ir as ir

from ..quantization.matmul_nbits import PackedWeight, quantize_rtn
from ..quantization.packing import (DEFAULT_ZERO_POINT, pack_codes, pack_onnx_4bit, unpack_codes,
                                    unpack_zero_points)
from .base import Pass, name_of, replace_node, static_dim
from .lowering_record import Lowering, record_lowering

__all__ = ["BLOCK_SIZE", "Deferred", "PackSpec", "PackedWithMins", "Packer", "Plan", "PlanningPacker", "RTNPacker",
           "default_plan", "defer", "dequantize_linear_rejection", "float_matrix", "keep_float", "lazy_initializer", "qdq_arrays",
           "quantize_matmuls_qdq", "quantize_rtn_positive", "rtn_packer", "tied_head", "weight_tensor"]

logger = logging.getLogger(__name__)

BLOCK_SIZE = 32
#: The first ai.onnx opset whose DequantizeLinear takes ``block_size`` and 4-bit types.
MIN_OPSET = 21

class PackedWithMins(Protocol):
    """A packer's result with the Q4_1 split's block minima besides the codes (``quantize_matmuls.QuantizedWeight``)."""

    @property
    def packed(self) -> PackedWeight: ...

    @property
    def mins(self) -> np.ndarray | None: ...


Packer = Callable[[ir.Value, bool], "PackedWeight | PackedWithMins | None"]


@runtime_checkable
class PlanningPacker(Protocol):
    """A packer that also says what it will produce before it packs (its ``spec``: the default plan)."""

    def __call__(self, value: ir.Value, transposed: bool) -> PackedWeight | PackedWithMins | None: ...

    def spec(self, value: ir.Value, transposed: bool) -> PackSpec | None: ...


@dataclass(frozen=True)
class PackSpec:
    """What a packer will produce for one weight, known before it packs: enough to build the graph."""

    bits: int
    block_size: int = BLOCK_SIZE
    zero_points: str | None = None  # None (default 8 / 128), "uint8" or "float"
    mins: bool = False  # the Q4_1 split's block minima

    @classmethod
    def of(cls, packed: PackedWeight, mins: np.ndarray | None = None) -> PackSpec:
        zp = packed.zero_points
        kind = None if zp is None else ("uint8" if zp.dtype == np.uint8 else "float")
        return cls(packed.bits, packed.block_size, kind, mins is not None)


Plan = Callable[[ir.Value, bool], "PackSpec | None"]


def float_matrix(value: ir.Value | None) -> TypeGuard[ir.Value]:
    """A constant 2-D float32 weight (the only kind the quantization passes touch)."""
    tensor = value.const_value if value is not None else None
    return tensor is not None and len(tensor.shape) == 2 and tensor.dtype == ir.DataType.FLOAT


def weight_tensor(value: ir.Value) -> ir.TensorProtocol:
    """``value``'s constant; a ValueError naming it where it has none (what a packer quantizes, it needs)."""
    tensor = value.const_value
    if tensor is None:
        raise ValueError(f"{value.name}: a weight to quantize must be a constant")
    return tensor


@dataclass(frozen=True, eq=False)
class Deferred:
    """One weight's packing: its logical ``[n, k]`` shape and spec now, its arrays when written."""

    name: str
    n: int
    k: int
    spec: PackSpec
    get: Callable[[], tuple[PackedWeight, np.ndarray | None]]  # (packed, mins), computed once

    @property
    def k_blocks(self) -> int:
        return -(-self.k // self.spec.block_size)


def _unwrap(result: PackedWeight | PackedWithMins) -> tuple[PackedWeight, np.ndarray | None]:
    if isinstance(result, PackedWeight):
        return result, None
    return result.packed, result.mins


def default_plan(pack: Packer) -> Plan | None:
    """The packer's own ``spec`` where it has one (a :class:`PlanningPacker`): then it packs only when written."""
    return pack.spec if isinstance(pack, PlanningPacker) else None


def defer(pack: Packer, plan: Plan | None, value: ir.Value, transposed: bool) -> Deferred | None:
    """The packing of ``value`` (a constant 2-D float weight), or None where the packer leaves it float."""
    shape = weight_tensor(value).shape.numpy()
    n, k = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
    name = value.name

    def check(packed: PackedWeight, mins, spec: PackSpec | None) -> PackSpec:
        got = PackSpec.of(packed, mins)
        if (packed.n, packed.k) != (n, k):
            raise ValueError(f"{name}: packed as [{packed.n}, {packed.k}], the weight is [N, K] = [{n}, {k}]")
        if spec is not None and got != spec:
            raise ValueError(f"{name}: packed as {got}, not as planned {spec}")
        return got

    if plan is None:  # the packer has to run now to tell what it makes
        result = pack(value, transposed)
        if result is None:
            return None
        packed, mins = _unwrap(result)
        return Deferred(name_of(value), n, k, check(packed, mins, None), lambda: (packed, mins))
    spec = plan(value, transposed)
    if spec is None:
        return None

    @functools.cache
    def get() -> tuple[PackedWeight, np.ndarray | None]:
        result = pack(value, transposed)
        if result is None:
            raise ValueError(f"{name}: the packer returned None after planning {spec}")
        packed, mins = _unwrap(result)
        check(packed, mins, spec)
        return packed, mins

    return Deferred(name_of(value), n, k, spec, get)  # the new initializers are named after the weight


# --- packers --------------------------------------------------------------------------------

def quantize_rtn_positive(weight: np.ndarray, bits: int = 4, block_size: int = BLOCK_SIZE) -> PackedWeight:
    """Symmetric round-to-nearest with positive scales (TensorRT's requirement), as a MatMulNBits PackedWeight.

    Per block ``scale = max|x| / (2**(bits-1) - 1)`` (1 for an all-zero block), codes
    ``clip(rint(x / scale), -qmax, qmax)`` stored with the default zero point (8 / 128): the range is
    ``[-7, 7]`` / ``[-127, 127]``, one code fewer than :func:`quantize_rtn`'s, error ``<= scale / 2``.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2 or not np.isfinite(w).all():
        raise ValueError(f"weight must be a finite 2-D [N, K] array, not {w.shape}")
    if bits not in DEFAULT_ZERO_POINT or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"bits must be 4 or 8 and block_size a power of two >= 16, not {bits}, {block_size}")
    n, k = w.shape
    kb = -(-k // block_size)
    x = np.pad(w, ((0, 0), (0, kb * block_size - k))).reshape(n, kb, block_size)  # zeros: code zp
    qmax = (1 << (bits - 1)) - 1
    amax = np.abs(x).max(axis=-1)
    scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint(x / scale[..., None]), -qmax, qmax) + DEFAULT_ZERO_POINT[bits]
    return PackedWeight(pack_codes(codes.astype(np.uint8), bits), scale.reshape(-1), None, bits, block_size, n, k)


@dataclass(frozen=True)
class RTNPacker:
    """Round-to-nearest blockwise quantization of the float weight itself (see :func:`rtn_packer`)."""

    bits: int
    block_size: int = BLOCK_SIZE
    symmetric: bool = True
    positive_scales: bool = False

    def __post_init__(self):
        if self.bits not in DEFAULT_ZERO_POINT:
            raise ValueError(f"bits must be 4 or 8, not {self.bits}")
        if self.positive_scales and not self.symmetric:
            raise ValueError("positive_scales is a symmetric quantization")

    def spec(self, value: ir.Value, transposed: bool) -> PackSpec:
        return PackSpec(self.bits, self.block_size, None if self.symmetric else "uint8")

    def __call__(self, value: ir.Value, transposed: bool) -> PackedWeight:
        array = weight_tensor(value).numpy()
        w = np.ascontiguousarray(array if transposed else array.T)
        if self.positive_scales:
            return quantize_rtn_positive(w, self.bits, self.block_size)
        return quantize_rtn(w, self.bits, self.block_size, symmetric=self.symmetric)


def rtn_packer(bits: int, block_size: int = BLOCK_SIZE, *, symmetric: bool = True,
               positive_scales: bool = False) -> RTNPacker:
    """The default packer: :func:`~ember.compiler.quantization.quantize_rtn` (symmetric, block 32), which
    gives the same codes as ``quantize_matmuls(bits)``' RTN weights. ``symmetric=False``: uint8 zero
    points. ``positive_scales=True``: :func:`quantize_rtn_positive` (for TensorRT)."""
    return RTNPacker(bits, block_size, symmetric, positive_scales)


# --- the DQ layout --------------------------------------------------------------------------

def qdq_arrays(packed: PackedWeight, name: str = "weight") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A PackedWeight as DequantizeLinear inputs for the MatMul's ``[K, N]`` weight, blocks along K (axis 0).

    Returns ``(codes, scales, zero_points)``: codes ``[K, N]`` int8 (default zero point: ``q - 8`` /
    ``q - 128``) or uint8 (with uint8 zero points), float32 scales ``[k_blocks, N]``, uint8 zero points
    ``[k_blocks, N]`` or None. 4-bit codes are returned one per byte (see :func:`pack_onnx_4bit`).
    """
    zp = packed.zero_points
    if zp is not None and zp.dtype != np.uint8:
        raise ValueError(f"{name}: float zero points ({zp.dtype}) have no DequantizeLinear form "
                         "(its zero point has the codes' integer type)")
    n, k, kb, bits = packed.n, packed.k, packed.k_blocks, packed.bits
    codes = unpack_codes(packed.b, bits).reshape(n, kb * packed.block_size)[:, :k]
    if zp is None:
        codes = (codes.astype(np.int16) - DEFAULT_ZERO_POINT[bits]).astype(np.int8)
        zero_points = None
    else:
        zero_points = np.ascontiguousarray(unpack_zero_points(zp, bits, n, kb).astype(np.uint8).T)
    scales = np.ascontiguousarray(packed.scales.astype(np.float32).reshape(n, kb).T)
    return np.ascontiguousarray(codes.T), scales, zero_points


def lazy_initializer(graph: ir.Graph, name: str, dtype: ir.DataType, shape: tuple[int, ...],
                     make: Callable[[], np.ndarray]) -> ir.Value:
    """A registered initializer whose array ``make()`` computes only when the model is written.

    ``name`` gets ``.1``, ``.2``... where it is taken (by another pass or weight). 4-bit types take
    ``make()``'s integers one per element and are packed as ONNX stores them (:func:`pack_onnx_4bit`).
    """
    base, i = name, 1
    while name in graph.initializers:
        name, i = f"{base}.{i}", i + 1

    def build() -> ir.TensorProtocol:
        array = np.ascontiguousarray(make())
        if array.shape != tuple(shape):
            raise ValueError(f"{name}: computed shape {array.shape}, planned {tuple(shape)}")
        if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
            return ir.PackedTensor(pack_onnx_4bit(array), dtype, shape=list(shape), name=name)
        return ir.tensor(array, dtype=dtype, name=name)

    tensor = ir.LazyTensor(build, dtype=dtype, shape=ir.Shape(list(shape)), name=name)
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)), const_value=tensor)
    graph.register_initializer(value)
    return value


FORM = "DequantizeLinear + MatMul"


def dequantize_linear_rejection(spec: PackSpec, opset: int) -> str | None:
    """Why a weight packed as ``spec`` has no blocked ``DequantizeLinear`` form in a graph of ai.onnx ``opset``.

    ONNX's limits, which onnxruntime's CPU kernel keeps (1.32, tried by the tests): ``block_size`` from opset
    21; codes int4 / uint4 / int8 / uint8 (the ones this pass writes); an integer zero point of the codes'
    type, so no float zero points (GGUF Q4_1 repacked) and no block minima (the Q4_1 / Q4_K split). K and N
    are free: the last block may be short."""
    if opset < MIN_OPSET:
        return f"blocked DequantizeLinear needs ai.onnx opset >= {MIN_OPSET}, the graph imports {opset}"
    if spec.bits not in (4, 8):
        return f"codes must be 4- or 8-bit, not {spec.bits}-bit"
    if spec.mins:
        return "block minima (GGUF Q4_1 / Q4_K split) have no form: the zero point has the codes' integer type"
    if spec.zero_points == "float":
        return "float zero points (GGUF Q4_1 repacked) have no form: the zero point has the codes' integer type"
    return None


def _dq_initializers(graph: ir.Graph, weight: Deferred, suffix: str) -> list[ir.Value]:
    spec, name = weight.spec, weight.name
    signed = spec.zero_points is None
    dtype = {(4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4,
             (8, True): ir.DataType.INT8, (8, False): ir.DataType.UINT8}[spec.bits, signed]
    arrays = functools.cache(lambda: qdq_arrays(weight.get()[0], name))
    kb, k, n = weight.k_blocks, weight.k, weight.n

    def zero_points() -> np.ndarray:
        zp = arrays()[2]
        assert zp is not None  # unsigned codes: defer checked that the packing has uint8 zero points
        return zp

    inputs = [lazy_initializer(graph, f"{name}.dq{spec.bits}{suffix}", dtype, (k, n), lambda: arrays()[0]),
              lazy_initializer(graph, f"{name}.dq_scales{suffix}", ir.DataType.FLOAT, (kb, n), lambda: arrays()[1])]
    if not signed:
        inputs.append(lazy_initializer(graph, f"{name}.dq_zero_points{suffix}", dtype, (kb, n), zero_points))
    return inputs


def keep_float(model: ir.Model, node: ir.Node, form: str, reason: str) -> None:
    """Record that ``form`` rejected ``node``, which stays as it is (float32): a fallback of the weight passes."""
    logger.info("%s stays float32: %s: %s", node.name, form, reason)
    record_lowering(model, Lowering(node.name or "", node.op_type, f"{node.op_type} (float32)",
                                    (f"{form}: {reason}",)))


def tied_head(node: ir.Node) -> bool:
    """``Gemm(x, E, transB=1)`` without bias, alpha or transA: ``x @ E.T`` (the tied output projection)."""
    attrs = node.attributes
    return (node.op_type == "Gemm" and node.domain == "" and len(node.inputs) == 2
            and attrs.get("transB") is not None and attrs["transB"].value == 1
            and (attrs.get("transA") is None or attrs["transA"].value == 0)
            and (attrs.get("alpha") is None or attrs["alpha"].value == 1.0))


def quantize_matmuls_qdq(pack: Packer, *, plan: Plan | None = None, name_suffix: str = "") -> Pass:
    """The pass: constant-weight MatMuls and tied Gemm heads -> ``MatMul(x, DequantizeLinear(...))``.

    ``pack(weight_value, transposed)``: see the module docstring (:func:`rtn_packer` for RTN weights);
    ``plan`` (default: ``pack.spec`` if it has one) lets the packer run only when the model is written.
    ``name_suffix`` is appended to the new initializers' names (``{weight}.dq4``, ``{weight}.dq_scales``,
    ``{weight}.dq_zero_points``).
    """
    plan = plan if plan is not None else default_plan(pack)

    def run(model: ir.Model) -> ir.Model:
        graph = model.graph
        opset = graph.opset_imports.get("", 0)
        # (id(weight), transposed) -> (weight: kept alive so the id stays its own, (DQ inputs, block) or
        # None where the weight stays float, the reason DQ rejects it or None)
        planned: dict[tuple[int, bool], tuple[ir.Value, tuple[list[ir.Value], int] | None, str | None]] = {}
        for node in list(graph):
            if node.domain != "" or not (node.op_type == "MatMul" or tied_head(node)):
                continue
            value, transposed = node.inputs[1], node.op_type == "Gemm"
            if not float_matrix(value):
                continue
            key = (id(value), transposed)
            if key not in planned:  # one set of initializers per weight, however many nodes use it
                deferred = defer(pack, plan, value, transposed)
                reason = None if deferred is None else dequantize_linear_rejection(deferred.spec, opset)
                dq_inputs = None if deferred is None or reason is not None else (
                    _dq_initializers(graph, deferred, name_suffix), deferred.spec.block_size)
                planned[key] = (value, dq_inputs, reason)
            _, dq_inputs, reason = planned[key]
            if reason is not None:
                keep_float(model, node, FORM, reason)
            if dq_inputs is None:
                continue
            inputs, block_size = dq_inputs
            prefix = node.name or value.name
            k, n = static_dim(inputs[0], 0), static_dim(inputs[0], 1)
            weight = ir.Value(name=f"{prefix}/DequantizeLinear_output_0", type=ir.TensorType(ir.DataType.FLOAT),
                              shape=ir.Shape([k, n]))
            dq = ir.Node("", "DequantizeLinear", inputs,
                         [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", block_size)],
                         outputs=[weight], name=f"{prefix}/DequantizeLinear")
            if node.op_type == "MatMul":
                graph.insert_before(node, dq)
                node.replace_input_with(1, weight)
            else:
                out = ir.Value()
                matmul = ir.Node("", "MatMul", [node.inputs[0], weight], outputs=[out], name=f"{prefix}/MatMul")
                replace_node(model, node, [dq, matmul], [out])
        return model

    run.__name__ = "quantize_matmuls_qdq"
    return run

