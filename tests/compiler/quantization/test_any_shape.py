"""Quantization of any shape (issue 10), products and lookups: weights whose K is not a multiple of the 32-weight
block or is smaller than it, odd N, vocabularies that are not multiples of 8 or 32, through every quantized form
ember writes, run by onnxruntime and compared with a numpy reference of the same quantization. What the kernels
take: ``any_shape.py``.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from ember.compiler.passes.cleanup import remove_unused
from ember.compiler.passes.lowering_record import recorded_lowerings
from ember.compiler.passes.quantize_embedding import quantize_embedding
from ember.compiler.passes.quantize_matmuls_qdq import rtn_packer
from ember.compiler.targets import get_target
from ember.graphs.ir.graph import BLOCKS_META, TOKEN_EMBEDDING_META
from ember.graphs.weights.adapter import QuantizedBlocks

from ...reference.tiny_gguf import HEADS as GGUF_HEADS, VOCAB as GGUF_VOCAB, random_q4_k, write_tiny_llama_gguf
from ..test_gguf_block_encodings import lowered as lowered_gguf, run as run_gguf_model
from .any_shape import (SHAPES, VOCAB, assert_close, dq_weight, encoded, nbits_weight, op_types, rng, run,
                        set_accuracy_level)
from .test_quantize_embedding import random_ids, tied_model
from .test_quantize_matmuls_qdq import two_layer_model


# --- products: MatMul weights and the tied head ----------------------------------------------


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("encoding", ["q8_0", "q4_0", "q4_1", "q4_k"])
def test_matmul_nbits(tmp_path, encoding, k, n):
    """ort-cpu's passes for ``encoding`` on float weights (RTN: 8- / 4-bit symmetric, 4-bit with uint8 zero points
    for q4_1 / q4_k): both products become MatMulNBits, and onnxruntime computes ``x @ W.T`` with the dequantized
    codes, within float32 rounding at accuracy level 0 and within the int8 rounding of x at the target's level 4."""
    model = encoded(two_layer_model(k, n, vocab=VOCAB), "ort-cpu", encoding)
    assert op_types(model) == ["MatMulNBits", "MatMulNBits"]
    assert recorded_lowerings(model) == []  # nothing fell back
    layer, head = model.graph
    w, e = nbits_weight(layer), nbits_weight(head)
    assert w.shape == (n, k) and e.shape == (VOCAB, n)
    x = rng(1).standard_normal((3, k)).astype(np.float32)
    (h4, logits4), _ = run(model, tmp_path / "level4", {"x": x})
    set_accuracy_level(model, 0)
    (h, logits), _ = run(model, tmp_path / "level0", {"x": x})
    assert_close(h, x @ w.T, 1e-5)
    assert_close(logits, h @ e.T, 1e-5)
    assert_close(h4, x @ w.T, 2e-2)
    assert_close(logits4, h4 @ e.T, 2e-2)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("encoding", ["q8_0", "q4_0"])
def test_dequantize_linear(tmp_path, encoding, k, n):
    """ort-cpu-qdq: ``MatMul(x, DequantizeLinear(codes))`` with a short last block runs as written, and fused by
    onnxruntime into MatMulNBits, both computing ``x @ W`` with the dequantized codes (accuracy level 0)."""
    model = encoded(two_layer_model(k, n, vocab=VOCAB), "ort-cpu-qdq", encoding)
    assert op_types(model) == ["DequantizeLinear", "MatMul", "DequantizeLinear", "MatMul"]
    assert recorded_lowerings(model) == []
    dq_layer, _, dq_head, _ = model.graph
    w, e = dq_weight(dq_layer), dq_weight(dq_head)
    assert w.shape == (k, n) and e.shape == (n, VOCAB)
    x = rng(2).standard_normal((3, k)).astype(np.float32)
    for optimize in (False, True):
        (h, logits), ops = run(model, tmp_path / f"optimize{optimize}", {"x": x}, optimize=optimize)
        assert ops == (["MatMulNBits"] * 2 if optimize else ["DequantizeLinear", "MatMul"] * 2)
        assert_close(h, x @ w, 1e-5)
        assert_close(logits, h @ e, 1e-5)


def dynamic_quantize_matmul(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, pairs_saturate: bool) -> np.ndarray:
    """onnxruntime's ``DynamicQuantizeMatMul`` in numpy: x to uint8 with one scale and zero point for the tensor
    (its range widened to include 0, float32 arithmetic, rounding half to even), the integer product of those
    uint8 codes with the int8 weight codes, less the zero point's share, scaled by ``x_scale * scales`` (float32).

    ``pairs_saturate``: the product as the x86 AVX2 kernel without VNNI computes it (``vpmaddubsw``): each sum of
    two neighbouring products along K clipped to int16 before the int32 accumulation."""
    x = x.astype(np.float32)
    lo, hi = min(np.float32(x.min()), np.float32(0)), max(np.float32(x.max()), np.float32(0))
    scale = (hi - lo) / np.float32(255)
    zero_point = np.rint(np.clip(np.float32(0) - lo / scale, 0, 255)).astype(np.int64)
    q = np.clip(np.rint(x / scale) + zero_point, 0, 255).astype(np.int64)
    w = codes.astype(np.int64)
    if pairs_saturate:
        odd = q.shape[1] % 2
        q, w = np.pad(q, ((0, 0), (0, odd))), np.pad(w, ((0, odd), (0, 0)))
        pairs = q[:, 0::2, None] * w[None, 0::2] + q[:, 1::2, None] * w[None, 1::2]  # [M, K / 2, N]
        product = np.clip(pairs, -32768, 32767).sum(axis=1)
    else:
        product = q @ w
    product = product - zero_point * w.sum(axis=0)
    return product * (scale * scales.astype(np.float32)).astype(np.float64)


@pytest.mark.parametrize("k,n", SHAPES)
def test_dynamic_quantize_matmul(tmp_path, k, n):
    """w8a8: a MatMul of any shape becomes DynamicQuantizeMatMul with per-channel int8 codes, computed as its
    integer arithmetic says (the Gemm head stays float: w8a8 is for encoders, which have none). That arithmetic
    depends on the CPU: exact with VNNI, pairwise saturating on AVX2 without it (this machine: random activations
    put some outputs off the exact product by up to 29 % of the output's largest value)."""
    model = encoded(two_layer_model(k, n, vocab=VOCAB), "ort-cpu", "w8a8")
    assert op_types(model) == ["DynamicQuantizeMatMul", "Gemm"]
    layer = next(iter(model.graph))
    codes, scales = (value.const_value.numpy() for value in layer.inputs[1:3])
    assert codes.shape == (k, n) and scales.shape == (n,)
    x = rng(3).standard_normal((3, k)).astype(np.float32)
    (h, _), _ = run(model, tmp_path, {"x": x})
    errors = [float(np.abs(h - reference).max() / np.abs(reference).max())
              for reference in (dynamic_quantize_matmul(x, codes, scales, saturate) for saturate in (False, True))]
    assert min(errors) <= 1e-5, f"off both the exact and the pairwise-saturating product: {errors}"


# --- lookups: GatherBlockQuantized over odd vocabularies ---------------------------------------

LOOKUPS = [pytest.param(161, 72, id="V=161,K=72"), pytest.param(1001, 20, id="V=1001,K=20<block"),
           pytest.param(161, 8, id="V=161,K=8<block"), pytest.param(1001, 100, id="V=1001,K=100")]
RTN = [pytest.param(8, True, id="8bit"), pytest.param(4, True, id="4bit"), pytest.param(4, False, id="4bit-zp")]


@pytest.mark.parametrize("vocab,hidden", LOOKUPS)
@pytest.mark.parametrize("bits,symmetric", RTN)
def test_lookup_and_tied_head(tmp_path, bits, symmetric, vocab, hidden):
    """``quantize_embedding`` with the tied head over one B: the lookup returns the dequantized rows bit for bit
    (the padded tail of the last block sliced off), the head computes with the same codes."""
    model = tied_model(hidden, vocab=vocab)
    model = remove_unused(quantize_embedding(rtn_packer(bits, symmetric=symmetric), tied_head_too=True,
                                             accuracy_level=0)(model))
    slicing = ["Slice"] if hidden % 32 else []
    assert op_types(model) == ["GatherBlockQuantized", "Reshape", *slicing, "MatMulNBits"]
    assert recorded_lowerings(model) == []
    gather, *_, head = model.graph
    assert gather.inputs[0] is head.inputs[1]
    table = nbits_weight(head)
    ids = random_ids(vocab)
    x = rng(4).standard_normal((2, hidden)).astype(np.float32)
    (rows, logits), _ = run(model, tmp_path, {"input_ids": ids, "x": x})
    assert np.array_equal(rows, table.astype(np.float32)[ids])
    assert_close(logits, x @ table.T, 1e-5)


KEPT_TABLES = [pytest.param("q8_0", "Q8_0", 64, id="Q8_0"), pytest.param("q4_0", "Q4_0", 64, id="Q4_0"),
               pytest.param("q4_1", "Q4_1", 64, id="Q4_1"), pytest.param("q4_k", "Q4_K", 256, id="Q4_K")]


@pytest.mark.parametrize("vocab", [161, 1001])
@pytest.mark.parametrize("encoding,qtype,hidden", KEPT_TABLES)
def test_kept_gguf_table(tmp_path, encoding, qtype, hidden, vocab):
    """ort-cpu's own lookup: a GGUF's token table kept in its blocks (GGUF rows are whole blocks; the vocabulary
    is any count) is looked up with GatherBlockQuantized (plus the block minima for Q4_1 / Q4_K) and gives ggml's
    rows bit for bit; the tied head, MatMulNBits over the same blocks, computes with ggml's weights."""
    gguf = pytest.importorskip("gguf")
    T = gguf.GGMLQuantizationType
    model = tied_model(hidden, vocab=vocab)
    table = model.graph.initializers["model.embed_tokens.weight"]
    if qtype == "Q4_K":
        raw = random_q4_k(vocab, hidden, rng(5))
    else:
        raw = gguf.quants.quantize(table.const_value.numpy(), T[qtype])
    want = gguf.quants.dequantize(raw, T[qtype]).reshape(vocab, hidden).astype(np.float32)
    table.const_value = ir.tensor(want, name=table.name)  # what the graph builder loads: the dequantized table
    table.meta[BLOCKS_META] = QuantizedBlocks(qtype, (vocab, hidden), lambda: raw)
    table.meta[TOKEN_EMBEDDING_META] = True
    model = encoded(model, "ort-cpu", encoding)
    ops = op_types(model)
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1
    assert ("Gather" in ops) == (qtype in ("Q4_1", "Q4_K"))  # the block minima, looked up beside the codes
    assert "Gemm" not in ops and recorded_lowerings(model) == []
    set_accuracy_level(model, 0)
    ids = random_ids(vocab)
    x = rng(6).standard_normal((2, hidden)).astype(np.float32)
    (rows, logits), _ = run(model, tmp_path, {"input_ids": ids, "x": x})
    assert np.array_equal(rows, want[ids])
    assert_close(logits, x.astype(np.float64) @ want.T.astype(np.float64), 1e-5)


@pytest.mark.parametrize("encoding,qtype", [("q4_0", "Q8_0"), ("q8_0", "Q4_0"), ("q4_0", "Q4_1")])
def test_a_gguf_table_is_looked_up_in_its_blocks_in_any_encoding(tmp_path, encoding, qtype):
    """The lookup keeps the GGUF table's own blocks even where the encoding quantizes the head otherwise (SmolLM2's
    Q8_0 table in a q4_0 artifact): its rows are the dequantized table's bit for bit, as a float table's were; the
    tied head is the encoding's MatMulNBits."""
    gguf = pytest.importorskip("gguf")
    vocab, hidden = 161, 64
    model = tied_model(hidden, vocab=vocab)
    table = model.graph.initializers["model.embed_tokens.weight"]
    raw = gguf.quants.quantize(table.const_value.numpy(), gguf.GGMLQuantizationType[qtype])
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(vocab, hidden).astype(np.float32)
    table.const_value = ir.tensor(want, name=table.name)
    table.meta[BLOCKS_META] = QuantizedBlocks(qtype, (vocab, hidden), lambda: raw)
    table.meta[TOKEN_EMBEDDING_META] = True
    model = encoded(model, "ort-cpu", encoding)
    ops = op_types(model)
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1 and "Gemm" not in ops
    ids = random_ids(vocab)
    x = rng(6).standard_normal((2, hidden)).astype(np.float32)
    (rows, logits), _ = run(model, tmp_path, {"input_ids": ids, "x": x})
    assert np.array_equal(rows, want[ids])
    assert_close(logits, x.astype(np.float64) @ want.T.astype(np.float64), 0.2)  # the head: the encoding's error


@pytest.mark.parametrize("encoding,qtype,hidden,intermediate", [("q4_1", "Q4_1", 64, 100), ("q4_k", "Q4_K", 256, 300)])
def test_gguf_with_rows_no_block_type_takes(tmp_path, encoding, qtype, hidden, intermediate):
    """A GGUF whose feed-forward width is no multiple of 32: llama.cpp keeps ``ffn_down`` (rows of that width) in
    a float type, no block type taking them, and the other matrices in ``qtype`` (``ffn_gate`` / ``ffn_up`` have
    N = that width). Its q4_1 / q4_k build keeps those blocks (the split form's minima) and quantizes ffn_down
    round-to-nearest with zero points at K = 100 / 300: every product MatMulNBits, and the logits close to the
    GGUF's own (accuracy level 4: cosine > 0.99; only ffn_down adds 4-bit error)."""
    pytest.importorskip("gguf")
    types = {name: qtype for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}
    types["ffn_down"] = "F32"
    path = write_tiny_llama_gguf(tmp_path / "odd-ffn.gguf", types=(types, types), hidden=hidden,
                                 intermediate=intermediate)
    tokens = rng(13).integers(0, GGUF_VOCAB, 10).astype(np.int64)
    head_dim = hidden // GGUF_HEADS
    reference = run_gguf_model(lowered_gguf(path), tokens, head_dim)
    model = lowered_gguf(path, get_target("ort-cpu").encoding_passes[encoding])
    float_products = [n.name for n in model.graph if n.op_type in ("MatMul", "Gemm")
                      and not n.name.endswith(("/BlockSum", "/BlockMins"))]  # the split form's minima term
    assert float_products == []
    assert not [r for r in recorded_lowerings(model) if r.op in ("MatMul", "Gemm", "Gather")]
    down = [n for n in model.graph if n.op_type == "MatMulNBits" and n.attributes["K"].value == intermediate]
    assert len(down) == 2 and all(len(n.inputs) == 4 for n in down)  # RTN with uint8 zero points, one per layer
    assert sum(1 for n in model.graph if n.name.endswith("/AddMins")) == 2 * 3  # q|k|v, o, gate|up: kept blocks
    ours = run_gguf_model(model, tokens, head_dim)
    cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
    print(f"{encoding} with float ffn_down rows of {intermediate}: min cosine to the GGUF's float32 build "
          f"{cosine.min():.5f}")
    assert cosine.min() > 0.99


