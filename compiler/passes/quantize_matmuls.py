"""Weight-only quantization: float MatMuls with constant weights -> ``com.microsoft.MatMulNBits``.

Decoding on a CPU is bound by the weight bytes read per token; 4-bit weights read 1/8 of float32's.
Each MatMul whose right operand is a constant ``[K, N]`` weight (after the q|k|v and gate|up fusions) and
the tied output projection (``Gemm(x, E, transB=1)``: ``E`` is already ``[N, K]``) are replaced by
MatMulNBits. ``accuracy_level`` 4 (int8 activations inside the kernel) is the fast level for both widths
on onnxruntime's CPU kernels: measured in ``compiler/quantization/matmul_nbits.py``, 8-bit at level 0 is
25-37x slower than float32 at decode, 4-bit level 4 is 2-4.5x faster. The embedding table stays float
(a lookup reads one row per token). Quantization runs when the artifact is written: the packed arrays
are lazy tensors computed once per weight.

Where the weights come from:

* A weight the checkpoint stores in one of the ``keep_blocks`` GGUF types (the value's
  ``meta[BLOCKS_META]``) is repacked as it is (:func:`~ember.compiler.quantization.from_gguf_blocks`):
  Q4_0 and Q8_0 exactly, at their own width. **Q4_1** (``w = d * q + m``) has a float minimum per block
  that MatMulNBits' integer zero points cannot express, and its float zero points disable onnxruntime's
  prepacked kernels (about 20x slower than float32 at decode). The exact path used instead is the split
  (:func:`~ember.compiler.quantization.q4_1_split`): ``MatMulNBits(A; d, q)`` at its default zero point 8
  plus ``(A @ S) @ (m + 8 d)``, where ``A @ S`` sums A by blocks of 32 (``S [K, K/32]`` of ones and zeros),
  added to it: three small nodes more per weight. **Q4_K** (256-weight super-blocks of eight 32-weight
  sub-blocks with 6-bit scales and minima) takes the same split form, exactly (:func:`q4_k_split`).
* Every other float weight is quantized round-to-nearest, blockwise (block 32) at ``bits``.

Any shape: MatMulNBits cuts K into ``ceil(K / 32)`` blocks and puts no other limit on K or N (onnxruntime
1.32's ``matmul_nbits_helper.h``; run on K = 1..40 and 63..257 with odd N, both widths, both accuracy levels,
and ``tests/compiler/quantization/test_any_shape.py`` keeps issue 10's cases). The packers fill the last block's
padding with the zero-point code, so it dequantizes to 0 and contributes nothing: nothing else is padded, and
no weight stays float for its shape. What the kernel does reject is :func:`matmul_nbits_rejection`'s
(``test_kernel_limits.py`` holds it to the kernel): such a weight stays float32, recorded in the lowering record.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from gguf import GGMLQuantizationType

from ember.graphs.ir.graph import BLOCKS_META
from ember.graphs.ir.versions import MS_DOMAIN, MS_OPSET

from ..quantization.matmul_nbits import PackedWeight, from_gguf_blocks, q4_1_split, q4_k_split, quantize_rtn
from .base import Pass, name_of, nodes_of
from .quantize_matmuls_qdq import PackSpec, float_matrix, keep_float, tied_head, weight_tensor

logger = logging.getLogger(__name__)

ACCURACY_LEVEL = 4
BLOCK_SIZE = 32
#: GGUF block types that can be kept as they are, and the MatMulNBits width they become.
BLOCK_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "Q4_K": 4}
#: Block types with a float minimum per 32-block: kept in the split form (MatMulNBits + minima term).
SPLIT_TYPES = {"Q4_1": q4_1_split, "Q4_K": q4_k_split}
FORM = "MatMulNBits"


def matmul_nbits_rejection(spec: PackSpec) -> str | None:
    """Why onnxruntime's CPU MatMulNBits cannot take a weight packed as ``spec``, or None.

    The kernel's checks (onnxruntime 1.32, ``contrib_ops/cpu/quantization/matmul_nbits_helper.h`` and the
    kernel's constructor, each tried by the tests): ``bits`` 2, 4 or 8; ``block_size`` a power of two >= 16;
    no float zero points with 8-bit codes ("MatMulNBits on CPU does not support 8-bit weights with
    floating-point zero points", at session creation). K and N are free: K is cut into ``ceil(K / block)``
    blocks, the last one padded."""
    if spec.bits not in (2, 4, 8):
        return f"bits must be 2, 4 or 8, not {spec.bits}"
    if spec.block_size < 16 or spec.block_size & (spec.block_size - 1):
        return f"block_size must be a power of two >= 16, not {spec.block_size}"
    if spec.bits == 8 and spec.zero_points == "float":
        return "8-bit codes take uint8 zero points only, not float ones"
    return None


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A logical ``[N, K]`` weight as MatMulNBits inputs; ``mins`` ``[N, k_blocks]`` for the Q4_1 split."""

    packed: PackedWeight
    mins: np.ndarray | None = None


class WeightPacker:
    """``pack(weight_value, transposed)``: the quantized form of a constant 2-D float weight.

    ``transposed``: the value is already ``[N, K]`` (a ``Gemm`` with ``transB=1``, or an embedding table);
    else it is a MatMul's ``[K, N]``. Checkpoint blocks of a type in ``keep_blocks`` are repacked, the rest
    is RTN at ``bits``. ``spec`` tells what ``pack`` will make without packing (the passes build the graph
    first and pack when the model is written). ``only``: a predicate on the value; others stay float.
    """

    def __init__(self, bits: int, keep_blocks: tuple[str, ...] = (), symmetric: bool = True,
                 only: Callable[[ir.Value], bool] | None = None, exact_rows: bool = False):
        unknown = set(keep_blocks) - set(BLOCK_BITS)
        if unknown:
            raise ValueError(f"cannot keep {', '.join(sorted(unknown))} blocks; supported: {', '.join(BLOCK_BITS)}")
        self.bits, self.keep_blocks, self.symmetric, self.only = bits, tuple(keep_blocks), symmetric, only
        # Split forms (Q4_1 / Q4_K): zero point 0 reproduces ggml's rows bit for bit (lookups); without a
        # zero-point input MatMulNBits runs its faster default kernel (products). See q4_1_split.
        self.exact_rows = exact_rows

    def _kept(self, value: ir.Value):
        blocks = value.meta.get(BLOCKS_META)
        return blocks if blocks is not None and blocks.qtype in self.keep_blocks else None

    def form(self, value: ir.Value) -> str:
        """``Q4_1`` etc. for kept checkpoint blocks, ``rtn4`` / ``rtn8`` otherwise (for logs)."""
        blocks = self._kept(value)
        return blocks.qtype if blocks is not None else f"rtn{self.bits}"

    def spec(self, value: ir.Value, transposed: bool) -> PackSpec | None:
        if self.only is not None and not self.only(value):
            return None
        blocks = self._kept(value)
        if blocks is not None:
            split = blocks.qtype in SPLIT_TYPES
            return PackSpec(BLOCK_BITS[blocks.qtype], BLOCK_SIZE, "uint8" if split and self.exact_rows else None,
                            split)
        return PackSpec(self.bits, BLOCK_SIZE, None if self.symmetric else "uint8", False)

    def __call__(self, value: ir.Value, transposed: bool) -> QuantizedWeight | None:
        if self.only is not None and not self.only(value):
            return None
        blocks = self._kept(value)
        if blocks is not None:
            raw = blocks.load()
            if blocks.qtype in SPLIT_TYPES:
                return QuantizedWeight(*SPLIT_TYPES[blocks.qtype](raw, blocks.shape, exact_rows=self.exact_rows))
            return QuantizedWeight(from_gguf_blocks(raw, GGMLQuantizationType[blocks.qtype], blocks.shape))
        array = weight_tensor(value).numpy()
        return QuantizedWeight(quantize_rtn(np.ascontiguousarray(array if transposed else array.T), self.bits,
                                            BLOCK_SIZE, symmetric=self.symmetric))


def weight_packer(bits: int, keep_blocks: tuple[str, ...] = (), symmetric: bool = True,
                  only: Callable[[ir.Value], bool] | None = None, exact_rows: bool = False) -> WeightPacker:
    return WeightPacker(bits, keep_blocks, symmetric, only, exact_rows)


def _lazy(name: str, dtype: ir.DataType, shape: tuple[int, ...], make) -> ir.Value:
    tensor = ir.LazyTensor(lambda: ir.tensor(make(), name=name), dtype=dtype, shape=ir.Shape(list(shape)), name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)), const_value=tensor)


def quantize_matmuls(bits: int, keep_blocks: tuple[str, ...] = (), symmetric: bool = True,
                     accuracy_level: int = ACCURACY_LEVEL) -> Pass:
    """The pass for ``bits``-bit RTN weights (4 or 8), keeping checkpoint blocks of the ``keep_blocks`` types.

    ``accuracy_level`` 0 computes in float32 (for checking exactness; slow, see above)."""
    pack = weight_packer(bits, keep_blocks, symmetric)

    def run(model: ir.Model) -> ir.Model:
        graph = model.graph
        candidates = [(node, False) for node in nodes_of(model, "MatMul")]
        candidates += [(node, True) for node in nodes_of(model, "Gemm") if tied_head(node)]
        changed = False
        kept: dict[str, int] = {}
        for node, transposed in candidates:
            weight_value = node.inputs[1]
            if not float_matrix(weight_value):
                continue
            spec = pack.spec(weight_value, transposed)
            if spec is None:
                continue
            reason = matmul_nbits_rejection(spec)
            if reason is not None:
                keep_float(model, node, FORM, reason)
                continue
            _replace(graph, node, weight_value, transposed, pack,
                     (spec.bits, spec.zero_points is not None, spec.mins), accuracy_level)
            form = pack.form(weight_value)
            kept[form] = kept.get(form, 0) + 1
            changed = True
        if changed:
            graph.opset_imports[MS_DOMAIN] = MS_OPSET
            logger.info("MatMulNBits weights: %s", ", ".join(f"{n} {form}" for form, n in sorted(kept.items())))
        return model

    run.__name__ = f"quantize_matmuls_{bits}bit" + (f"_keep_{'_'.join(keep_blocks)}" if keep_blocks else "")
    return run


def _replace(graph: ir.Graph, node: ir.Node, weight_value: ir.Value, transposed: bool, pack: WeightPacker,
             form: tuple[int, bool, bool], accuracy_level: int) -> None:
    """Put ``MatMulNBits`` (plus the Q4_1 minima term) where the float ``node`` was."""
    bits, has_zero_points, has_mins = form
    shape = weight_tensor(weight_value).shape.numpy()
    n, k = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
    k_blocks = -(-k // BLOCK_SIZE)
    name = name_of(weight_value)  # the new initializers are named after it
    packed = functools.cache(lambda: pack(weight_value, transposed))

    def checked() -> QuantizedWeight:
        result = packed()
        if result is None:
            raise ValueError(f"{name}: the packer returned None after planning {form}")
        if (result.packed.bits, result.packed.zero_points is not None, result.mins is not None) != form:
            raise AssertionError(f"{name}: packed as {result.packed.bits}-bit, not as planned {form}")
        return result

    def minima_t() -> np.ndarray:
        mins = checked().mins
        assert mins is not None  # checked(): planned with minima (has_mins), packed with them
        return np.ascontiguousarray(mins.T.astype(np.float32))

    initializers = [_lazy(f"{name}.q{bits}", ir.DataType.UINT8, (n, k_blocks, BLOCK_SIZE * bits // 8),
                          lambda: checked().packed.b),
                    _lazy(f"{name}.scales", ir.DataType.FLOAT, (n * k_blocks,),
                          lambda: checked().packed.scales.astype(np.float32))]
    if has_zero_points:
        zp_size = n * (-(-k_blocks // 2) if bits == 4 else k_blocks)
        initializers.append(_lazy(f"{name}.zero_points", ir.DataType.UINT8, (zp_size,),
                                  lambda: checked().packed.zero_points))
    for value in initializers:
        graph.register_initializer(value)
    out = ir.Value(name=f"{node.name}/MatMulNBits_output_0")
    new_nodes = [ir.Node(MS_DOMAIN, "MatMulNBits", [node.inputs[0], *initializers],
                         [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
                          ir.AttrInt64("block_size", BLOCK_SIZE), ir.AttrInt64("accuracy_level", accuracy_level)],
                         outputs=[out], name=f"{node.name}/MatMulNBits")]
    old = node.outputs[0]
    out.shape, out.type = old.shape, old.type
    if has_mins:
        out = _add_minima_term(graph, node, new_nodes, out, name, n, k, minima_t)
        out.shape, out.type = old.shape, old.type
    graph.insert_before(node, new_nodes)
    is_output = any(v is old for v in graph.outputs)
    ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
    if is_output:  # the graph output keeps its name (``logits``)
        output_name, old.name = old.name, None
        out.name = output_name
    graph.remove(node, safe=True)


def _block_indicator(graph: ir.Graph, k: int) -> ir.Value:
    """``S [K, K/32]`` with ``S[i, j] = 1`` where element ``i`` is in block ``j``: ``x @ S`` sums x by blocks.

    One MatMul instead of Reshape + ReduceSum (fewer nodes per step); shared by every weight with this K."""
    name = f"ember.block_indicator.{k}x{BLOCK_SIZE}"
    if name in graph.initializers:
        return graph.initializers[name]
    k_blocks = k // BLOCK_SIZE
    indicator = np.repeat(np.eye(k_blocks, dtype=np.float32), BLOCK_SIZE, axis=0)
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([k, k_blocks]),
                     const_value=ir.tensor(indicator, name=name))
    graph.register_initializer(value)
    return value


def _add_minima_term(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node], product: ir.Value, name: str,
                     n: int, k: int, mins_t) -> ir.Value:
    """``product + (x @ S) @ mins.T``: the Q4_1 block minima, exactly (``x @ S`` sums ``x`` by blocks).

    GGUF rows are whole blocks (ggml quantizes nothing else), so K here always is."""
    if k % BLOCK_SIZE:
        raise ValueError(f"{name}: Q4_1 rows of {k} are not whole blocks of {BLOCK_SIZE}")
    mins = _lazy(f"{name}.mins", ir.DataType.FLOAT, (k // BLOCK_SIZE, n), mins_t)
    graph.register_initializer(mins)
    prefix = node.name
    sums = ir.Value(name=f"{prefix}/BlockSum_output_0")
    offsets = ir.Value(name=f"{prefix}/BlockMins_output_0")
    total = ir.Value(name=f"{prefix}/AddMins_output_0")
    new_nodes += [
        ir.Node("", "MatMul", [node.inputs[0], _block_indicator(graph, k)], outputs=[sums], name=f"{prefix}/BlockSum"),
        ir.Node("", "MatMul", [sums, mins], outputs=[offsets], name=f"{prefix}/BlockMins"),
        ir.Node("", "Add", [product, offsets], outputs=[total], name=f"{prefix}/AddMins"),
    ]
    return total
