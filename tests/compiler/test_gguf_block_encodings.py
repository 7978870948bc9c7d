"""A GGUF's own blocks through the compiler: repacked into MatMulNBits as they are, never requantized.

A tiny Llama GGUF (Q4_1, Q4_0 and Q8_0 matrices, Q/K rows permuted as llama.cpp writes them, Q8_0 tied
embeddings) is lowered for ort-cpu twice: float32 (blocks dequantized) and ``q4_1`` (blocks kept). With
MatMulNBits computing in float32 (``accuracy_level`` 0) the two must agree to float32 rounding; that
checks the repacking, the Q/K row un-permutation applied to raw rows, the q|k|v and gate|up fusions of
blocks, and the exact Q4_1 split (``d * q`` plus the block minima term).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from ember.compiler import CompileOptions
from ember.compiler.passes.cleanup import remove_unused
from ember.compiler.passes.quantize_embedding import quantize_embedding
from ember.compiler.passes.quantize_matmuls import quantize_matmuls, weight_packer
from ember.compiler.targets import get_target
from ember.graphs.architectures.llama import SPEC
from ember.graphs.nn.transformer import ReturnLogits
from ember.runtime.pipelines import PIPELINE_REGISTRY, ModelSource, PipelineConfig
from ember.runtime.compile_cache import resolve_encoding

from ..reference.tiny_gguf import DEFAULT_TYPES, HEAD_DIM, KV_HEADS, LAYERS, VOCAB, write_tiny_llama_gguf
from ..reference.tiny_models import make_model

KEEP_ALL = ("Q4_0", "Q4_1", "Q8_0")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def lowered(path, passes=()) -> ir.Model:
    source = ModelSource.resolve(path)
    model = SPEC.build(source.hf_config(), source.open_weights(), "gguf",
                       CompileOptions(return_logits=ReturnLogits.ALL).graph_options())
    for compiler_pass in get_target("ort-cpu").passes + tuple(passes):
        model = compiler_pass(model)
    return model


def run(model: ir.Model, tokens: np.ndarray, head_dim: int = HEAD_DIM) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    shape = (1, KV_HEADS, 32, head_dim)
    feeds = {"input_ids": tokens[None], "input_lengths": np.array([len(tokens)], np.int32),
             "cache_lengths": np.array([0], np.int32)}
    for i in range(LAYERS):
        feeds[f"past_key_values.{i}.key"] = np.zeros(shape, np.float32)
        feeds[f"past_key_values.{i}.value"] = np.zeros(shape, np.float32)
    return session.run(["logits"], feeds)[0]


def test_kept_blocks_compute_what_the_dequantized_gguf_computes(tiny_gguf):
    tokens = np.random.default_rng(1).integers(0, VOCAB, 12).astype(np.int64)
    reference = run(lowered(tiny_gguf), tokens)
    table = weight_packer(8, KEEP_ALL, only=lambda v: v.name == "model.embed_tokens.weight")
    kept = lowered(tiny_gguf, [quantize_matmuls(4, keep_blocks=KEEP_ALL, symmetric=False, accuracy_level=0),
                               quantize_embedding(table), remove_unused])
    ops = [n.op_type for n in kept.graph]
    nbits = [n for n in kept.graph if n.op_type == "MatMulNBits"]
    # layer 0: q|k|v, o, gate|up, down; layer 1: q, k (Q4_0) and v (Q8_0) stay apart, o, gate|up, down; the head
    assert len(nbits) == 4 + 6 + 1
    assert sorted(int(n.attributes["bits"].value) for n in nbits) == [4] * 8 + [8] * 3
    assert ops.count("Gemm") == 0 and ops.count("GatherBlockQuantized") == 1  # the Q8_0 table, looked up as is
    assert sum(1 for n in kept.graph if n.name.endswith("/AddMins")) == 4 + 2  # one per Q4_1 weight
    ours = run(kept, tokens)
    rel = float(np.abs(ours - reference).max() / np.abs(reference).max())
    print(f"kept GGUF blocks vs dequantized float32: max relative logit error {rel:.3g}")
    assert rel < 1e-5


def test_fast_level_stays_close(tiny_gguf):
    """The target's ``q4_1`` passes: at ``accuracy_level`` 4 (int8 activations, the production setting) the
    error is the activations' rounding."""
    tokens = np.random.default_rng(2).integers(0, VOCAB, 12).astype(np.int64)
    reference = run(lowered(tiny_gguf), tokens)
    model = lowered(tiny_gguf, get_target("ort-cpu").encoding_passes["q4_1"])
    assert [n.op_type for n in model.graph].count("GatherBlockQuantized") == 1
    ours = run(model, tokens)
    cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
    rel = float(np.abs(ours - reference).max() / np.abs(reference).max())
    print(f"accuracy_level 4: max relative logit error {rel:.3g}, min cosine {cosine.min():.6f}")
    assert cosine.min() > 0.999


def test_rtn_encodings_keep_only_their_own_block_type(tiny_gguf):
    model = lowered(tiny_gguf, [quantize_matmuls(8, keep_blocks=("Q8_0",)), remove_unused])
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert {int(n.attributes["bits"].value) for n in nbits} == {8}
    assert not any(n.name.endswith("/AddMins") for n in model.graph)


def test_default_encoding_is_the_gguf_own_and_q4_1_needs_q4_1_blocks(tiny_gguf, tmp_path):
    """Under the exact-default size a model defaults to float32; above it, a GGUF to its own quantization."""
    source = ModelSource.resolve(tiny_gguf)
    architecture = PIPELINE_REGISTRY.retrieve_architecture(tiny_gguf)
    assert max(source.block_types(), key=source.block_types().get) == "Q4_1"
    assert resolve_encoding(PipelineConfig(model_path=tiny_gguf), architecture, source) == "float32"
    assert resolve_encoding(PipelineConfig(model_path=tiny_gguf), architecture, source, exact_below=0) == "q4_1"
    assert resolve_encoding(PipelineConfig(model_path=tiny_gguf, encoding="float32"), architecture, source) == "float32"

    make_model("llama-gqa-llama3", tmp_path / "hf")
    hf = ModelSource.resolve(tmp_path / "hf")
    assert resolve_encoding(PipelineConfig(model_path=hf.path), architecture, hf) == "float32"
    with pytest.raises(ValueError, match="keeps a GGUF's own Q4_1 blocks.*use q4_0 or q8_0"):
        resolve_encoding(PipelineConfig(model_path=hf.path, encoding="q4_1"), architecture, hf)


def test_q4_k_blocks_are_kept_exactly(tmp_path):
    """Q4_K (256-weight super-blocks) as MatMulNBits + block minima, block 32: exact, and a Q4_K file's default."""
    q4_k = {name: "Q4_K" for name in DEFAULT_TYPES[0]}
    path = write_tiny_llama_gguf(tmp_path / "tiny-q4k.gguf", types=(q4_k, DEFAULT_TYPES[1]), hidden=256,
                                 intermediate=256)
    tokens = np.random.default_rng(4).integers(0, VOCAB, 9).astype(np.int64)
    reference = run(lowered(path), tokens, head_dim=64)
    kept = lowered(path, [quantize_matmuls(4, keep_blocks=("Q4_0", "Q4_1", "Q8_0", "Q4_K"), symmetric=False,
                                           accuracy_level=0), remove_unused])
    assert sum(1 for n in kept.graph if n.name.endswith("/AddMins")) == 4 + 2  # Q4_K layer 0 + Q4_1 of layer 1
    rel = float(np.abs(run(kept, tokens, head_dim=64) - reference).max() / np.abs(reference).max())
    print(f"kept Q4_K blocks vs dequantized float32: max relative logit error {rel:.3g}")
    assert rel < 1e-5
    source = ModelSource.resolve(path)
    architecture = PIPELINE_REGISTRY.retrieve_architecture(path)
    assert resolve_encoding(PipelineConfig(model_path=path), architecture, source, exact_below=0) == "q4_k"
