"""The embedding pass: ``Gather(table, ids)`` -> ``GatherBlockQuantized`` returns the dequantized table's rows
bit for bit, and the tied head's MatMulNBits reads the same B initializer."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from ember.compiler.passes.cleanup import remove_unused
from ember.compiler.passes.lowering_record import recorded_lowerings
from ember.compiler.passes.quantize_embedding import quantize_embedding
from ember.compiler.passes.quantize_matmuls import quantize_matmuls
from ember.compiler.passes.quantize_matmuls_qdq import PackSpec, rtn_packer
from ember.compiler.quantization import PackedWeight, dequantize, from_gguf_blocks, q4_1_split, quantize_rtn
from ember.compiler.quantization.onnx_models import matmul_nbits_model
from ember.graphs.ir.versions import IR_VERSION, ONNX_OPSET

FLOAT = ir.DataType.FLOAT
VOCAB = 300


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def tied_model(hidden: int, vocab: int = VOCAB, ids_type: ir.DataType = ir.DataType.INT64,
               ids_dims: tuple[str, ...] = ("batch", "sequence"), seed: int = 0) -> ir.Model:
    """``h = table[ids]`` (ids ``[batch, sequence]``) and ``logits = Gemm(x, table, transB=1)``."""
    ids = ir.Value(name="input_ids", type=ir.TensorType(ids_type), shape=ir.Shape(list(ids_dims)))
    x = ir.Value(name="x", type=ir.TensorType(FLOAT), shape=ir.Shape(["rows", hidden]))
    h = ir.Value(name="h", type=ir.TensorType(FLOAT), shape=ir.Shape([*ids_dims, hidden]))
    logits = ir.Value(name="logits", type=ir.TensorType(FLOAT), shape=ir.Shape(["rows", vocab]))
    graph = ir.Graph([ids, x], [h, logits], nodes=[], opset_imports={"": ONNX_OPSET})
    array = (rng(seed).standard_normal((vocab, hidden)) * 0.05).astype(np.float32)
    table = ir.Value(name="model.embed_tokens.weight", type=ir.TensorType(FLOAT), shape=ir.Shape([vocab, hidden]),
                     const_value=ir.tensor(array, name="model.embed_tokens.weight"))
    graph.register_initializer(table)
    graph.append(ir.Node("", "Gather", [table, ids], [ir.AttrInt64("axis", 0)], outputs=[h],
                         name="model.embed_tokens/Gather"))
    graph.append(ir.Node("", "Gemm", [x, table], [ir.AttrInt64("transB", 1)], outputs=[logits],
                         name="lm_head/Gemm"))
    return ir.Model(graph, ir_version=IR_VERSION)


def table_of(model: ir.Model) -> ir.Value:
    return model.graph.initializers["model.embed_tokens.weight"]


def run(model: ir.Model, tmp_path, feeds: dict) -> tuple[list[np.ndarray], int]:
    """Outputs of the model written as the ort-cpu target writes it, and the size of its files."""
    path = tmp_path / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data", alignment=64)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    size = path.stat().st_size + (tmp_path / "model.onnx.data").stat().st_size
    return sess.run(None, feeds), size


def nbits(packed: PackedWeight, a: np.ndarray, accuracy_level: int) -> np.ndarray:
    sess = ort.InferenceSession(matmul_nbits_model(packed, accuracy_level).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


def random_ids(vocab: int, shape=(3, 7), seed: int = 1, dtype=np.int64) -> np.ndarray:
    ids = rng(seed).integers(0, vocab, shape)
    ids.flat[0], ids.flat[-1], ids.flat[1] = 0, vocab - 1, vocab - 1
    return ids.astype(dtype)


CASES = [(4, True), (4, False), (8, True), (8, False)]


@pytest.mark.parametrize("hidden", [96, 80], ids=["K%32==0", "K%32!=0"])
@pytest.mark.parametrize("bits,symmetric", CASES, ids=[f"{b}bit-{'sym' if s else 'zp'}" for b, s in CASES])
def test_lookup_is_exact_and_shares_b(tmp_path, bits, symmetric, hidden):
    model = tied_model(hidden)
    pack = rtn_packer(bits, symmetric=symmetric)
    packed = pack(table_of(model), True)
    remove_unused(quantize_embedding(pack, tied_head_too=True)(model))

    ops = [(n.op_type, n.domain) for n in model.graph]
    expected = [("GatherBlockQuantized", "com.microsoft"), ("Reshape", "")] + ([("Slice", "")] if hidden % 32 else [])
    assert ops == expected + [("MatMulNBits", "com.microsoft")]
    gather = next(iter(model.graph))
    head = list(model.graph)[-1]
    assert gather.inputs[0] is head.inputs[1]  # one B initializer
    assert "model.embed_tokens.weight" not in model.graph.initializers  # the float table is gone
    assert list(gather.inputs[0].shape) == [VOCAB, -(-hidden // 32), 32 * bits // 8]

    ids = random_ids(VOCAB)
    x = rng(2).standard_normal((4, hidden)).astype(np.float32)
    (h, logits), _ = run(model, tmp_path, {"input_ids": ids, "x": x})
    assert h.shape == (3, 7, hidden)
    assert np.array_equal(h, dequantize(packed)[ids])  # bit-identical
    assert np.array_equal(logits, nbits(packed, x, accuracy_level=4))  # the head reads the same codes


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_ids_and_one_dimensional_ids(tmp_path, bits):
    for dims, shape in ((("batch", "sequence"), (3, 7)), (("tokens",), (9,))):
        model = tied_model(80, ids_type=ir.DataType.INT32, ids_dims=dims)
        pack = rtn_packer(bits)
        packed = pack(table_of(model), True)
        quantize_embedding(pack)(model)
        assert [n.op_type for n in model.graph][-1] == "Gemm"  # the head left alone
        ids = random_ids(VOCAB, shape, dtype=np.int32)
        (h, _), _ = run(model, tmp_path, {"input_ids": ids, "x": np.zeros((1, 80), np.float32)})
        assert h.shape == (*shape, 80)
        assert np.array_equal(h, dequantize(packed)[ids])


def test_sharing_saves_the_codes_once(tmp_path):
    """Lookup + head over one B: the file holds the codes once; with quantize_matmuls' head, twice."""
    hidden = 128
    ids = random_ids(VOCAB)
    x = rng(3).standard_normal((2, hidden)).astype(np.float32)
    shared = remove_unused(quantize_embedding(rtn_packer(4), tied_head_too=True)(tied_model(hidden)))
    (h1, l1), size_shared = run(shared, tmp_path, {"input_ids": ids, "x": x})
    separate = remove_unused(quantize_embedding(rtn_packer(4))(quantize_matmuls(4)(tied_model(hidden))))
    codes = [v for v in separate.graph.initializers.values() if list(v.shape) == [VOCAB, hidden // 32, 16]]
    assert len(codes) == 2  # quantize_matmuls' B for the head, and the lookup's own
    (h2, l2), size_separate = run(separate, tmp_path, {"input_ids": ids, "x": x})
    assert np.array_equal(h1, h2) and np.array_equal(l1, l2)  # same RTN codes either way
    # The other order: the lookup's initializer names do not collide with quantize_matmuls' own.
    other = remove_unused(quantize_matmuls(4)(quantize_embedding(rtn_packer(4))(tied_model(hidden))))
    (h3, l3), size_other = run(other, tmp_path, {"input_ids": ids, "x": x})
    assert np.array_equal(h1, h3) and np.array_equal(l1, l3) and size_other == size_separate
    b_bytes = VOCAB * hidden // 2
    assert size_separate - size_shared >= b_bytes


def test_q4_1_split_lookup_is_exact(tmp_path):
    """GGUF Q4_1 as (d, q, zero point 0) plus the block minima: ggml's rows, bit for bit."""
    gguf = pytest.importorskip("gguf")
    T = gguf.GGMLQuantizationType
    model = tied_model(96)
    array = table_of(model).const_value.numpy()
    raw = gguf.quants.quantize(array, T.Q4_1)
    want = gguf.quants.dequantize(raw, T.Q4_1).reshape(array.shape)

    class Split:
        def __init__(self, packed, mins):
            self.packed, self.mins = packed, mins

    calls = []

    def pack(value, transposed):
        calls.append(value.name)
        return Split(*q4_1_split(raw, array.shape, exact_rows=True))

    quantize_embedding(pack, plan=lambda v, t: PackSpec(4, 32, "uint8", mins=True), tied_head_too=True)(model)
    assert calls == []
    assert [n.op_type for n in model.graph] == ["GatherBlockQuantized", "Gather", "Add", "Reshape", "Gemm"]
    ids = random_ids(VOCAB)
    (h, _), _ = run(model, tmp_path, {"input_ids": ids, "x": np.zeros((1, 96), np.float32)})
    assert calls == [table_of(model).name]
    assert np.array_equal(h, want[ids])


def test_float_zero_points_keep_the_lookup_float():
    """GatherBlockQuantized's zero points have the data's type (uint8): a repacked Q4_1 table (float zero points)
    stays a float Gather, recorded with the kernel's reason, and its head is left alone."""
    gguf = pytest.importorskip("gguf")
    T = gguf.GGMLQuantizationType
    model = tied_model(64)
    array = table_of(model).const_value.numpy()
    q4_1 = from_gguf_blocks(gguf.quants.quantize(array, T.Q4_1), T.Q4_1, array.shape)
    quantize_embedding(lambda v, t: q4_1, tied_head_too=True)(model)
    assert [n.op_type for n in model.graph] == ["Gather", "Gemm"]
    assert "com.microsoft" not in model.graph.opset_imports
    (lowering,) = recorded_lowerings(model)
    assert (lowering.node, lowering.op, lowering.form) == ("model.embed_tokens/Gather", "Gather", "Gather (float32)")
    assert len(lowering.rejected) == 1 and lowering.rejected[0].startswith("GatherBlockQuantized: float zero points")


def test_q8_0_table_is_kept_exactly(tmp_path):
    """A GGUF Q8_0 table (SmolLM2's) repacked: the lookup returns ggml's rows and the head is MatMulNBits."""
    gguf = pytest.importorskip("gguf")
    T = gguf.GGMLQuantizationType
    model = tied_model(64)
    array = table_of(model).const_value.numpy()
    raw = gguf.quants.quantize(array, T.Q8_0)
    packed = from_gguf_blocks(raw, T.Q8_0, array.shape)
    quantize_embedding(lambda v, t: packed, tied_head_too=True)(model)
    ids = random_ids(VOCAB)
    x = rng(4).standard_normal((2, 64)).astype(np.float32)
    (h, logits), _ = run(model, tmp_path, {"input_ids": ids, "x": x})
    assert np.array_equal(h, gguf.quants.dequantize(raw, T.Q8_0).reshape(array.shape)[ids])
    assert np.array_equal(logits, nbits(packed, x, accuracy_level=4))


def test_packer_may_keep_a_table_float():
    model = tied_model(64)
    quantize_embedding(lambda v, t: None)(model)
    assert [n.op_type for n in model.graph] == ["Gather", "Gemm"]
    assert "com.microsoft" not in model.graph.opset_imports


def test_lazy_packing(tmp_path):
    calls = []
    rtn = rtn_packer(8)

    class Counting:
        spec = staticmethod(rtn.spec)

        def __call__(self, value, transposed):
            calls.append((value.name, transposed))
            return rtn(value, transposed)

    model = tied_model(64)
    packed = quantize_rtn(table_of(model).const_value.numpy(), 8)
    quantize_embedding(Counting(), tied_head_too=True)(model)
    assert calls == []
    ids = random_ids(VOCAB)
    (h, _), _ = run(model, tmp_path, {"input_ids": ids, "x": np.zeros((1, 64), np.float32)})
    assert calls == [("model.embed_tokens.weight", True)]  # once for B, both scales and the head
    assert np.array_equal(h, dequantize(packed)[ids])
    saved = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert sum(i.name == "model.embed_tokens.weight.gather_q8" for i in saved.graph.initializer) == 1
