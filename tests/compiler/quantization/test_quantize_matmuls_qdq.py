"""The Q/DQ pass: ``MatMul(x, DequantizeLinear(q, scale[, zp], axis=0, block_size=32))`` computes what
MatMulNBits computes from the same PackedWeight, run by onnxruntime's CPU EP both as written and fused."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from ember.compiler.passes.lowering_record import recorded_lowerings
from ember.compiler.passes.quantize_matmuls_qdq import (PackSpec, qdq_arrays, quantize_matmuls_qdq,
                                                        quantize_rtn_positive, rtn_packer)
from ember.compiler.quantization import PackedWeight, dequantize, from_gguf_blocks, quantize_rtn
from ember.compiler.quantization.onnx_models import matmul_nbits_model
from ember.compiler.quantization.packing import pack_onnx_4bit
from ember.graphs.ir.versions import IR_VERSION, ONNX_OPSET

FLOAT = ir.DataType.FLOAT


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(FLOAT), shape=ir.Shape(list(array.shape)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def two_layer_model(k: int, hidden: int, vocab: int, seed: int = 0) -> ir.Model:
    """``h = x @ W`` (W ``[k, hidden]``), ``logits = Gemm(h, E, transB=1)`` (E ``[vocab, hidden]``)."""
    x = ir.Value(name="x", type=ir.TensorType(FLOAT), shape=ir.Shape(["M", k]))
    h = ir.Value(name="h", type=ir.TensorType(FLOAT), shape=ir.Shape(["M", hidden]))
    logits = ir.Value(name="logits", type=ir.TensorType(FLOAT), shape=ir.Shape(["M", vocab]))
    graph = ir.Graph([x], [h, logits], nodes=[], opset_imports={"": ONNX_OPSET})
    w = initializer(graph, "w", (rng(seed).standard_normal((k, hidden)) * 0.1).astype(np.float32))
    e = initializer(graph, "embed", (rng(seed + 1).standard_normal((vocab, hidden)) * 0.1).astype(np.float32))
    graph.append(ir.Node("", "MatMul", [x, w], outputs=[h], name="layer/MatMul"))
    graph.append(ir.Node("", "Gemm", [h, e], [ir.AttrInt64("transB", 1)], outputs=[logits], name="lm_head/Gemm"))
    return ir.Model(graph, ir_version=IR_VERSION)


def session(model: ir.Model, tmp_path, optimize: bool = False, accuracy_level: int | None = 0,
            optimized: str | None = None) -> ort.InferenceSession:
    """The model as the ort-cpu target writes it (external data), in a one-thread CPU session."""
    path = tmp_path / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data", alignment=64)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if accuracy_level is not None:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if optimized:
        opts.optimized_model_filepath = str(tmp_path / optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def nbits(packed: PackedWeight, a: np.ndarray, accuracy_level: int = 0) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(matmul_nbits_model(packed, accuracy_level).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


def assert_product(y: np.ndarray, a: np.ndarray, w: np.ndarray, rtol: float = 1e-5) -> None:
    """``y == a @ w.T`` up to float32 accumulation: ``|y - ref| <= rtol * (|a| @ |w|.T)`` elementwise."""
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    bound = rtol * (np.abs(a64) @ np.abs(w64).T) + 1e-30
    excess = np.abs(y - a64 @ w64.T) / bound
    assert excess.max() <= 1, f"{excess.max():.3g}x the float32 rounding bound"


def packed_weights(model: ir.Model, pack) -> tuple[PackedWeight, PackedWeight]:
    inits = model.graph.initializers
    return pack(inits["w"], False), pack(inits["embed"], True)


# --- the pass against onnxruntime -----------------------------------------------------------

CASES = [(4, True), (4, False), (8, True), (8, False)]


@pytest.mark.parametrize("k,hidden", [(96, 64), (80, 48)], ids=["K%32==0", "K%32!=0"])
@pytest.mark.parametrize("bits,symmetric", CASES, ids=[f"{b}bit-{'sym' if s else 'zp'}" for b, s in CASES])
def test_qdq_equals_matmul_nbits(tmp_path, bits, symmetric, k, hidden):
    model = two_layer_model(k, hidden, vocab=200)
    pack = rtn_packer(bits, symmetric=symmetric)
    pw, pe = packed_weights(model, pack)
    assert (pw.zero_points is None) == symmetric
    quantize_matmuls_qdq(pack)(model)

    ops = [(n.op_type, n.domain) for n in model.graph]
    assert ops == [("DequantizeLinear", ""), ("MatMul", ""), ("DequantizeLinear", ""), ("MatMul", "")]
    dq = next(iter(model.graph))
    q = dq.inputs[0]
    assert q.dtype == {(4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4,
                       (8, True): ir.DataType.INT8, (8, False): ir.DataType.UINT8}[bits, symmetric]
    assert list(q.shape) == [k, hidden]  # [K, N], nothing padded
    assert list(dq.inputs[1].shape) == [-(-k // 32), hidden]
    assert len(dq.inputs) == (2 if symmetric else 3)
    assert dq.attributes["axis"].value == 0 and dq.attributes["block_size"].value == 32
    assert model.graph.outputs[1].name == "logits"

    x = rng(5).standard_normal((3, k)).astype(np.float32)
    # As written: DequantizeLinear + MatMul, the weight exactly dequantize(packed).
    h, logits = session(model, tmp_path).run(None, {"x": x})
    assert_product(h, x, dequantize(pw))
    assert_product(logits, h, dequantize(pe))
    assert np.allclose(h, nbits(pw, x), rtol=1e-5, atol=1e-6)
    assert np.allclose(logits, nbits(pe, h), rtol=1e-5, atol=1e-6)

    # Optimized: onnxruntime fuses DQ + MatMul into MatMulNBits (accuracy level 0 here): the very same
    # product as the MatMulNBits model of the same PackedWeight.
    fused = session(model, tmp_path, optimize=True, optimized="fused.onnx")
    assert [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node] == ["MatMulNBits"] * 2
    h0, logits0 = fused.run(None, {"x": x})
    assert np.array_equal(h0, nbits(pw, x))
    assert np.array_equal(logits0, nbits(pe, h0))


def test_default_fusion_is_accuracy_level_4(tmp_path):
    model = two_layer_model(96, 64, vocab=100)
    pack = rtn_packer(4)
    pw, _ = packed_weights(model, pack)
    quantize_matmuls_qdq(pack)(model)
    x = rng(1).standard_normal((2, 96)).astype(np.float32)
    h, _ = session(model, tmp_path, optimize=True, accuracy_level=None, optimized="fused.onnx").run(None, {"x": x})
    levels = {a.i for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}
    assert np.array_equal(h, nbits(pw, x, accuracy_level=4))


def test_nothing_is_packed_before_writing(tmp_path):
    calls = []
    rtn = rtn_packer(4)

    class Counting:
        spec = staticmethod(rtn.spec)

        def __call__(self, value, transposed):
            calls.append(value.name)
            return rtn(value, transposed)

    model = two_layer_model(64, 32, vocab=50)
    quantize_matmuls_qdq(Counting())(model)
    assert calls == []
    session(model, tmp_path)
    assert sorted(calls) == ["embed", "w"]  # once per weight, although codes and scales are two tensors


def test_packer_without_plan_and_none(tmp_path):
    """A plain function packs during the pass; None leaves that weight float."""
    def pack(value, transposed):
        return None if value.name == "embed" else quantize_rtn(value.const_value.numpy().T, 8)

    model = two_layer_model(64, 32, vocab=50)
    w = model.graph.initializers["w"].const_value.numpy()
    quantize_matmuls_qdq(pack, name_suffix=".x")(model)
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "MatMul", "Gemm"]
    assert "w.dq8.x" in model.graph.initializers
    x = rng(2).standard_normal((2, 64)).astype(np.float32)
    h, _ = session(model, tmp_path).run(None, {"x": x})
    assert_product(h, x, dequantize(quantize_rtn(w.T, 8)))


def test_float_zero_points_keep_the_weight_float():
    """DequantizeLinear's zero point has the codes' integer type: a repacked Q4_1 weight (float zero points) or the
    Q4_1 split (block minima) stays a float MatMul, recorded with the reason; ``qdq_arrays`` refuses it."""
    gguf = pytest.importorskip("gguf")
    model = two_layer_model(64, 32, vocab=50)
    w = model.graph.initializers["w"].const_value.numpy()
    raw = gguf.quants.quantize(np.ascontiguousarray(w.T), gguf.GGMLQuantizationType.Q4_1)
    q4_1 = from_gguf_blocks(raw, gguf.GGMLQuantizationType.Q4_1, (32, 64))
    assert q4_1.zero_points.dtype == np.float32

    def pack(value, transposed):
        return q4_1 if value.name == "w" else None

    for plan, what in ((None, "float zero points"),
                       (lambda v, t: PackSpec(4, 32, "float") if v.name == "w" else None, "float zero points"),
                       (lambda v, t: PackSpec(4, 32, "uint8", mins=True) if v.name == "w" else None, "block minima")):
        model = two_layer_model(64, 32, vocab=50)
        quantize_matmuls_qdq(pack, plan=plan)(model)
        assert [n.op_type for n in model.graph] == ["MatMul", "Gemm"]
        assert model.graph.node(0).inputs[1].name == "w"
        (lowering,) = recorded_lowerings(model)
        assert (lowering.node, lowering.op, lowering.form) == ("layer/MatMul", "MatMul", "MatMul (float32)")
        assert len(lowering.rejected) == 1 and lowering.rejected[0].startswith(f"DequantizeLinear + MatMul: {what}")
    with pytest.raises(ValueError, match="wq: float zero points"):
        qdq_arrays(q4_1, "wq")


def test_plan_mismatch_is_reported(tmp_path):
    model = two_layer_model(64, 32, vocab=50)
    quantize_matmuls_qdq(rtn_packer(4), plan=lambda v, t: PackSpec(8))(model)
    with pytest.raises(ValueError, match="not as planned"):
        session(model, tmp_path)


# --- the DQ layout --------------------------------------------------------------------------

def test_qdq_arrays_layout():
    n, k = 5, 80
    packed = quantize_rtn(rng().standard_normal((n, k)).astype(np.float32), 4, symmetric=False)
    codes, scales, zp = qdq_arrays(packed)
    assert codes.shape == (k, n) and codes.dtype == np.uint8
    assert scales.shape == (3, n) and zp.shape == (3, n) and zp.dtype == np.uint8
    w = (codes.astype(np.float32) - np.repeat(zp, 32, axis=0)[:k]) * np.repeat(scales, 32, axis=0)[:k]
    assert np.array_equal(w.T, dequantize(packed))

    packed = quantize_rtn(rng(1).standard_normal((n, k)).astype(np.float32), 4)
    codes, scales, zp = qdq_arrays(packed)
    assert codes.dtype == np.int8 and zp is None and codes.min() >= -8 and codes.max() <= 7
    assert np.array_equal((codes * np.repeat(scales, 32, axis=0)[:k]).T, dequantize(packed))


def test_pack_onnx_4bit():
    assert pack_onnx_4bit(np.array([1, 2, -8, -1, 7])).tolist() == [0x21, 0xF8, 0x07]


@pytest.mark.parametrize("bits", [4, 8])
def test_positive_scales_for_tensorrt(tmp_path, bits):
    """TensorRT wants symmetric codes with strictly positive scales; the packed weight serves MatMulNBits too."""
    w = (rng(3).standard_normal((40, 80)) * 0.05).astype(np.float32)
    w[1] = 0.0
    packed = quantize_rtn_positive(w, bits)
    assert (packed.scales > 0).all() and packed.zero_points is None
    qmax = (1 << (bits - 1)) - 1
    codes, _, _ = qdq_arrays(packed)
    assert codes.min() >= -qmax and codes.max() <= qmax
    step = np.repeat(packed.scales.reshape(40, 3), 32, axis=1)[:, :80]
    assert (np.abs(dequantize(packed) - w) <= step / 2 * (1 + 1e-6)).all()
    assert (dequantize(packed)[1] == 0).all()

    model = two_layer_model(80, 40, vocab=60)
    pack = rtn_packer(bits, positive_scales=True)
    pw, _ = packed_weights(model, pack)
    quantize_matmuls_qdq(pack)(model)
    x = rng(4).standard_normal((2, 80)).astype(np.float32)
    h, _ = session(model, tmp_path).run(None, {"x": x})
    assert_product(h, x, dequantize(pw))
    with pytest.raises(ValueError, match="symmetric"):
        rtn_packer(4, symmetric=False, positive_scales=True)


def test_old_opset_keeps_weights_float():
    """Blocked DequantizeLinear needs opset 21: below it every weight stays float, each one recorded."""
    model = two_layer_model(64, 32, vocab=50)
    model.graph.opset_imports[""] = 19
    quantize_matmuls_qdq(rtn_packer(4))(model)
    assert [n.op_type for n in model.graph] == ["MatMul", "Gemm"]
    lowerings = recorded_lowerings(model)
    assert [(r.node, r.form) for r in lowerings] == [("layer/MatMul", "MatMul (float32)"),
                                                      ("lm_head/Gemm", "Gemm (float32)")]
    assert all(r.rejected == ("DequantizeLinear + MatMul: blocked DequantizeLinear needs ai.onnx opset >= 21, "
                              "the graph imports 19",) for r in lowerings)
