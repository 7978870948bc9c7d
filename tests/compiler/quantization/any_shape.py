"""Helpers of the any-shape quantization tests (issue 10): ``test_any_shape.py`` (products and lookups),
``test_kernel_limits.py`` (each rejection check against its kernel), ``test_any_shape_llama.py`` (end to end).

Quantization of any shape: weights whose K is not a multiple of the 32-weight block or is smaller than
it, odd N, vocabularies that are not multiples of 8 or 32, through every quantized form ember writes, run by
onnxruntime and compared with a numpy reference of the same quantization (the codes the pass wrote, dequantized
and multiplied in float64).

What onnxruntime 1.32's CPU kernels take, found by running them (and read in their sources):

* ``MatMulNBits``: any K and N. K is cut into ``ceil(K / block)`` blocks, and ember's packers fill the last
  block's padding with the zero-point code, so it dequantizes to exactly 0. It rejects bits other than 2, 4, 8,
  a block size that is not a power of two >= 16, and 8-bit codes with float zero points.
* ``GatherBlockQuantized`` (uint8 data, one block per last-axis row): any vocabulary and K; it rejects the same
  bits and block sizes, zero points not of the data's type (float ones) and indices that are not int32 / int64.
* blocked ``DequantizeLinear`` (+ ``MatMul``): any K (the last block is short) and N, as written and as
  onnxruntime fuses it into MatMulNBits; it needs opset 21 and integer zero points.
* ``DynamicQuantizeMatMul``: any K and N with per-output-channel scales; no limit ember's form meets. (Whatever
  the shape, its integer product saturates pairwise on x86 AVX2 without VNNI: see its test.)

So nothing needs padding beyond MatMulNBits' own block layout, and no weight stays float for its shape. Each
kernel's limits are a rejection check beside its pass; the checks are tested against the kernels here, and a node
a check rejects stays float32, recorded in the lowering record. End to end: a tiny Llama whose every matrix has
such a shape, per encoding, and a GGUF whose feed-forward rows no block type takes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from ember.compiler.quantization.packing import unpack_codes, unpack_zero_points
from ember.compiler.targets import get_target

from .test_quantize_matmuls_qdq import session

VOCAB = 161  # odd, not a multiple of 8 or 32: the tied head's N in every product case

# (K, N) of the first weight; the tied head then has K = N and N = VOCAB.
SHAPES = [pytest.param(72, 64, id="K=72"), pytest.param(100, 64, id="K=100"), pytest.param(40, 64, id="K=40"),
          pytest.param(20, 48, id="K=20<block"), pytest.param(8, 48, id="K=8<block"),
          pytest.param(64, 97, id="N=97"), pytest.param(64, 161, id="N=161")]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def encoded(model: ir.Model, target: str, encoding: str) -> ir.Model:
    """``model`` through the target's passes for ``encoding`` (the quantization passes only)."""
    for compiler_pass in get_target(target).encoding_passes[encoding]:
        model = compiler_pass(model)
    return model


def run(model: ir.Model, directory: Path, feeds: dict, *, optimize: bool = False,
        accuracy_level: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """The outputs of ``model`` written as ort-cpu writes it (external data), and the ops onnxruntime ran.

    Unoptimized unless ``optimize`` (then blocked DequantizeLinear + MatMul is fused into MatMulNBits at
    ``accuracy_level``)."""
    directory.mkdir(parents=True, exist_ok=True)
    outputs = session(model, directory, optimize, accuracy_level, optimized="optimized.onnx").run(None, feeds)
    ops = [n.op_type for n in onnx.load(str(directory / "optimized.onnx"), load_external_data=False).graph.node]
    return outputs, ops


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def set_accuracy_level(model: ir.Model, level: int) -> None:
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)


def assert_close(y: np.ndarray, reference: np.ndarray, rtol: float) -> None:
    """``|y - reference| <= rtol * max|reference|`` everywhere (1e-5: float32 rounding of these products)."""
    error = float(np.abs(y - reference).max() / np.abs(reference).max())
    assert error <= rtol, f"max error {error:.3g} of the output's max, bound {rtol:g}"


def nbits_weight(node: ir.Node) -> np.ndarray:
    """The float64 ``[N, K]`` weight a MatMulNBits node multiplies by: its codes, scales and zero points as the
    pass wrote them, dequantized (``(q - zp) * scale``). Asserts that the padding of the last block dequantizes
    to exactly 0."""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    kb = -(-k // block)
    b = node.inputs[1].const_value.numpy()
    assert b.shape == (n, kb, block * bits // 8)
    codes = unpack_codes(b, bits).reshape(n, kb, block).astype(np.float64)
    scales = node.inputs[2].const_value.numpy().reshape(n, kb, 1).astype(np.float64)
    zp_value = node.inputs[3] if len(node.inputs) > 3 else None
    zp = unpack_zero_points(None if zp_value is None else zp_value.const_value.numpy(), bits, n, kb)
    w = ((codes - zp[..., None]) * scales).reshape(n, kb * block)
    assert not w[:, k:].any(), "the padding of the last block must dequantize to 0"
    return w[:, :k]


def dq_weight(node: ir.Node) -> np.ndarray:
    """The float64 ``[K, N]`` weight a blocked DequantizeLinear node gives, from the codes the pass wrote."""
    codes = node.inputs[0].const_value.numpy().astype(np.float64)
    k = codes.shape[0]
    block = node.attributes["block_size"].value
    assert node.attributes["axis"].value == 0

    def per_element(value: ir.Value) -> np.ndarray:
        return np.repeat(value.const_value.numpy().astype(np.float64), block, axis=0)[:k]

    zero_points = per_element(node.inputs[2]) if len(node.inputs) > 2 else 0.0
    return (codes - zero_points) * per_element(node.inputs[1])


