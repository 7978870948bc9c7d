"""Quantized token embedding: ``Gather(table, ids)`` -> ``com.microsoft.GatherBlockQuantized``.

The float table is the largest tensor of a small model (SmolLM2-135M: 49152 x 576, 113 MB of its 540);
the lookup reads one row per token, so dequantizing on the fly costs little (measured below), and the
quantized table is 6.4x (4-bit) / 3.6x (8-bit) smaller with its scales.

onnxruntime 1.31's CPU kernel (schema and kernel types read from the binary, behaviour checked by the
tests): ``GatherBlockQuantized(data, indices, scales[, zero_points])``, attributes ``gather_axis``,
``quantize_axis``, ``block_size`` (a power of two >= 16), ``bits``. ``data`` may be uint8 (``bits`` 2,
4 or 8; 4-bit packed two per byte *along the last axis*, low nibble first; ``gather_axis`` must be 0
and ``quantize_axis`` the last axis; default zero point ``2**(bits-1)``, i.e. 8 / 128, MatMulNBits'
own), INT4 / UINT4 (``bits`` 4, default zero point 0), or FP8 / FP4; ``indices`` int32 or int64 (an
out-of-range id gives a zero row, not an error); output float32 or float16, the scales' type;
``scales`` and ``zero_points`` have data's rank, with the quantized axis divided into blocks.

Layout, and why: ``data`` is MatMulNBits' own ``B`` ``[N, k_blocks, block * bits / 8]`` as it is
(``quantize_axis`` 2: each last-axis row is one block), so that a tied output head's MatMulNBits and the
lookup *can* read one initializer: MatMulNBits insists on its 3-D B (a 2-D ``[N, K * bits / 8]`` B is
rejected at prepacking) and GatherBlockQuantized takes the 3-D one, so no Reshape of the weight is needed
(a ``Reshape(B)`` feeding a 2-D lookup is constant-folded by onnxruntime into a second, copied
initializer). The scales exist in both layouts (MatMulNBits takes ``[N * k_blocks]`` or ``[N,
k_blocks]``, not ``[N, k_blocks, 1]``; 4 bytes per 32 weights), 4-bit zero points too (MatMulNBits packs
them two per byte across blocks, here one per byte). The output ``[*ids, k_blocks, block]`` is reshaped
to ``[*ids, k_blocks * block]`` and, where K is not a multiple of the block, sliced to K (B is padded).

The tied head (``tied_head_too=True``): a ``Gemm(x, table, transB=1)`` on the same table becomes
``MatMulNBits(x, B, ...)`` here, over the lookup's B; run this pass *before* ``quantize_matmuls`` then.
Otherwise (the default) the head is left to ``quantize_matmuls`` in either order, and the codes are
stored twice. Measured on a SmolLM2-sized tied table (49152 x 576, RTN, external data as ort-cpu writes
it, onnxruntime 1.31, one session): sharing saves the file 14.2 MB at 4 bits (35.4 -> 21.2 MB) and
28.3 MB at 8 bits (63.7 -> 35.4 MB), but *costs* resident memory: +13.5 / +27 MB RSS after loading
(36.1 -> 49.6 / 49.6 -> 76.6 MB; the peak while loading is the same either way). MatMulNBits prepacks
B into a buffer of its own anyway; unshared, onnxruntime then drops the head's B, and the lookup's copy,
memory-mapped from the data file, only pages in the rows looked up, whereas a shared B, read whole by
the prepacking, stays resident for the lookup (this assumes onnxruntime maps the external data file, as
it does for ort-cpu's 64-byte aligned ``model.onnx.data``). Hence the default.

Cost of the lookup (one thread, CPU time, same table): 1 id 12 us float Gather, 16 / 15 us 4 / 8-bit
(session overhead dominates); 128 ids 41 us float, 192 / 117 us 4 / 8-bit.

Codes come from the same packers as :mod:`.quantize_matmuls_qdq` (``pack(table_value, True)``, the table
being the logical ``[N, K] = [vocab, hidden]`` weight; a plan keeps packing until the model is
written). The Q4_1 split (``mins``: ``w = d * q + m``, stored as scale ``d`` and zero point 0) becomes
the lookup plus ``Gather(mins, ids)`` added per block, exact; its head is then left to ``quantize_matmuls``
(which adds the minima term there).

Any shape: the vocabulary (N) is free, and so is K (B's last block padded, the output sliced; K below the
block size is one partial block), as run on vocabularies of 161 and 1001 and K = 8, 20, 72, 100 by
``tests/compiler/quantization/test_any_shape.py``. What the kernel rejects (float zero points, GGUF Q4_1
repacked, among them) is :func:`gather_block_quantized_rejection`'s (checked against the kernel by
``test_kernel_limits.py``): that lookup stays a float ``Gather``, recorded in the lowering record.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.versions import MS_DOMAIN, MS_OPSET

from ..quantization.packing import unpack_zero_points
from .base import Pass, input_at, replace_node
from .quantize_matmuls import ACCURACY_LEVEL, matmul_nbits_rejection
from .quantize_matmuls_qdq import (Deferred, Packer, PackSpec, Plan, default_plan, defer, float_matrix, keep_float,
                                   lazy_initializer, tied_head)

__all__ = ["gather_block_quantized_rejection", "quantize_embedding"]

FORM = "GatherBlockQuantized"


def gather_block_quantized_rejection(spec: PackSpec, ids: ir.Value) -> str | None:
    """Why onnxruntime's CPU GatherBlockQuantized cannot look up a table packed as ``spec`` by ``ids``, or None.

    The kernel's checks for uint8 data (onnxruntime 1.32, ``gather_block_quantized.cc``; each tried by the
    tests): ``bits`` 2, 4 or 8; ``block_size`` a power of two >= 16; zero points of the data's type (uint8:
    float zero points, a GGUF Q4_1 table repacked, have no form); indices int32 or int64 (its kernel types).
    The vocabulary and K are free. Besides the kernel, this lowering needs the indices' rank (its Reshape)."""
    if spec.bits not in (2, 4, 8):
        return f"bits must be 2, 4 or 8 for uint8 data, not {spec.bits}"
    if spec.block_size < 16 or spec.block_size & (spec.block_size - 1):
        return f"block_size must be a power of two >= 16, not {spec.block_size}"
    if spec.zero_points == "float":
        return "float zero points (GGUF Q4_1 repacked) have no form: its zero points have the data's type, uint8"
    if ids.dtype not in (ir.DataType.INT32, ir.DataType.INT64):
        return f"indices must be int32 or int64, not {ids.dtype}"
    if ids.shape is None:
        return "the indices' rank is unknown (the lookup's Reshape needs it)"
    return None


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return lazy_initializer(graph, name, ir.DataType.INT64, array.shape, lambda: array)


class _Table:
    """The initializers of one quantized table: MatMulNBits' B, scales and zero points in both layouts."""

    def __init__(self, graph: ir.Graph, table: Deferred, suffix: str):
        spec = table.spec
        self.graph, self.table, self.suffix = graph, table, suffix
        n, kb, bits, bs = table.n, table.k_blocks, spec.bits, spec.block_size

        def packed():
            return table.get()[0]

        self.b = self._lazy(f"gather_q{bits}", ir.DataType.UINT8, (n, kb, bs * bits // 8), lambda: packed().b)
        self.gather_scales = self._lazy("gather_scales", ir.DataType.FLOAT, (n, kb, 1),
                                        lambda: packed().scales.astype(np.float32).reshape(n, kb, 1))
        self.gather_zero_points = None
        if spec.zero_points == "uint8":  # one per byte: 4-bit ones are packed along the (length 1) last axis
            self.gather_zero_points = self._lazy(
                "gather_zero_points", ir.DataType.UINT8, (n, kb, 1),
                lambda: unpack_zero_points(packed().zero_points, bits, n, kb).astype(np.uint8).reshape(n, kb, 1))

        def minima() -> np.ndarray:
            mins = table.get()[1]
            assert mins is not None  # spec.mins: defer checked that the packing has them
            return mins.astype(np.float32).reshape(n, kb, 1)

        self.mins = None
        if spec.mins:
            self.mins = self._lazy("gather_mins", ir.DataType.FLOAT, (n, kb, 1), minima)

    def _lazy(self, what: str, dtype: ir.DataType, shape: tuple[int, ...], make) -> ir.Value:
        name = f"{self.table.name}.{what}{self.suffix}"
        return lazy_initializer(self.graph, name, dtype, shape, make)

    @functools.cached_property
    def head_inputs(self) -> list[ir.Value]:
        """MatMulNBits' scales and zero points (its B is ``self.b``)."""
        table, (n, kb, bits) = self.table, (self.table.n, self.table.k_blocks, self.table.spec.bits)
        inputs = [self._lazy("head_scales", ir.DataType.FLOAT, (n * kb,),
                             lambda: table.get()[0].scales.astype(np.float32).reshape(-1))]
        if table.spec.zero_points == "uint8":
            size = n * (-(-kb // 2) if bits == 4 else kb)
            inputs.append(self._lazy("head_zero_points", ir.DataType.UINT8, (size,),
                                     lambda: table.get()[0].zero_points))
        return inputs


def _lookup(model: ir.Model, node: ir.Node, t: _Table) -> None:
    """``GatherBlockQuantized`` (+ the Q4_1 minima) + Reshape (+ Slice) where the float ``Gather`` was."""
    graph, ids, spec = model.graph, input_at(node, 1), t.table.spec
    if ids.shape is None:  # gather_block_quantized_rejection keeps such a lookup float
        raise ValueError(f"{node.name or node.op_type}: the indices' rank is unknown (the lookup's Reshape needs it)")
    rank, kb, bs, k = len(ids.shape), t.table.k_blocks, spec.block_size, t.table.k
    prefix = node.name or f"{t.table.name}/Gather"
    inputs = [t.b, ids, t.gather_scales] + ([t.gather_zero_points] if t.gather_zero_points is not None else [])
    blocks = ir.Value(name=f"{prefix}/GatherBlockQuantized_output_0")
    nodes = [ir.Node(MS_DOMAIN, "GatherBlockQuantized", inputs,
                     [ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 2),
                      ir.AttrInt64("block_size", bs), ir.AttrInt64("bits", spec.bits)],
                     outputs=[blocks], name=f"{prefix}/GatherBlockQuantized")]
    if t.mins is not None:  # w = d * q + m: add each row's block minima
        mins, total = ir.Value(name=f"{prefix}/GatherMins_output_0"), ir.Value(name=f"{prefix}/AddMins_output_0")
        nodes += [ir.Node("", "Gather", [t.mins, ids], [ir.AttrInt64("axis", 0)], outputs=[mins],
                          name=f"{prefix}/GatherMins"),
                  ir.Node("", "Add", [blocks, mins], outputs=[total], name=f"{prefix}/AddMins")]
        blocks = total
    rows = ir.Value(name=f"{prefix}/Reshape_output_0")
    shape = _const(graph, f"{prefix}/rows_shape", np.array([0] * rank + [kb * bs], np.int64))
    nodes.append(ir.Node("", "Reshape", [blocks, shape], outputs=[rows], name=f"{prefix}/Reshape"))
    if kb * bs != k:  # the padded tail of the last block
        sliced = ir.Value(name=f"{prefix}/Slice_output_0")
        args = [_const(graph, f"{prefix}/slice_{what}", np.array([v], np.int64))
                for what, v in (("starts", 0), ("ends", k), ("axes", -1))]
        nodes.append(ir.Node("", "Slice", [rows, *args], outputs=[sliced], name=f"{prefix}/Slice"))
        rows = sliced
    replace_node(model, node, nodes, [rows])


def _head(model: ir.Model, node: ir.Node, t: _Table, accuracy_level: int) -> None:
    """``MatMulNBits(x, B, scales[, zero_points])`` where the tied ``Gemm(x, table, transB=1)`` was."""
    table, prefix = t.table, node.name or f"{t.table.name}/Gemm"
    out = ir.Value(name=f"{prefix}/MatMulNBits_output_0")
    matmul = ir.Node(MS_DOMAIN, "MatMulNBits", [node.inputs[0], t.b, *t.head_inputs],
                     [ir.AttrInt64("K", table.k), ir.AttrInt64("N", table.n), ir.AttrInt64("bits", table.spec.bits),
                      ir.AttrInt64("block_size", table.spec.block_size),
                      ir.AttrInt64("accuracy_level", accuracy_level)],
                     outputs=[out], name=f"{prefix}/MatMulNBits")
    replace_node(model, node, [matmul], [out])


def quantize_embedding(pack: Packer, *, plan: Plan | None = None, tied_head_too: bool = False,
                       accuracy_level: int = ACCURACY_LEVEL, name_suffix: str = "") -> Pass:
    """The pass: ``Gather(table, ids)`` of a constant 2-D float table (axis 0) -> GatherBlockQuantized.

    ``pack(table_value, True)`` gives the table's PackedWeight (None keeps that table float: wrap a packer
    to choose tables, e.g. not a BERT model's position or token-type table); ``plan`` (default:
    ``pack.spec``) defers packing to the writing of the model. ``tied_head_too``: a ``Gemm(x, table,
    transB=1)`` on the same table becomes MatMulNBits (``accuracy_level``) over the same B initializer.
    New initializers are ``{table}.gather_q{bits}`` (B), ``.gather_scales``, ``.gather_zero_points``,
    ``.gather_mins``, ``.head_scales``, ``.head_zero_points``, each followed by ``name_suffix`` (and
    ``.1``, ``.2`` where the name is taken); none is a name ``quantize_matmuls`` gives its initializers,
    which would collide there.
    """
    plan = plan if plan is not None else default_plan(pack)

    def run(model: ir.Model) -> ir.Model:
        graph = model.graph
        # id(table) -> (table: kept alive so the id stays its own, its packing or None, its initializers)
        tables: dict[int, tuple[ir.Value, Deferred | None, _Table | None]] = {}
        gathers = [n for n in graph if n.op_type == "Gather" and n.domain == ""
                   and (n.attributes.get("axis") is None or n.attributes["axis"].value == 0)
                   and float_matrix(n.inputs[0])]
        for node in gathers:
            table = input_at(node, 0)
            if id(table) not in tables:
                tables[id(table)] = (table, defer(pack, plan, table, True), None)
            _, deferred, t = tables[id(table)]
            if deferred is None:
                continue
            ids = input_at(node, 1)
            reason = gather_block_quantized_rejection(deferred.spec, ids)
            if reason is not None:
                keep_float(model, node, FORM, reason)
                continue
            if t is None:
                t = _Table(graph, deferred, name_suffix)
                tables[id(table)] = (table, deferred, t)
            _lookup(model, node, t)
            if tied_head_too and not deferred.spec.mins:
                # What the lookup takes, the head's MatMulNBits takes: its limits are a subset of the lookup's.
                assert matmul_nbits_rejection(deferred.spec) is None
                for user, _ in list(table.uses()):
                    if user.graph is graph and tied_head(user) and user.inputs[1] is table:
                        _head(model, user, t, accuracy_level)
        if any(t is not None for _, _, t in tables.values()):
            graph.opset_imports[MS_DOMAIN] = MS_OPSET
        return model

    run.__name__ = "quantize_embedding"
    return run
