"""``ort-cpu``: onnxruntime's CPU execution provider, the default target.

Lowering: ``ember.CachedAttention`` -> ``com.microsoft.GroupQueryAttention`` (in-place KV cache; rotary in the
kernel, or a ``RotaryEmbedding`` before it where the kernel's rotary rejects the head size), or, for shapes the
kernel rejects, ScatterND into the slot (in place) + explicit attention (``gqa_rejection``: each node's choice is
recorded in the manifest); ``ember.PagedAttention`` (PAGED) -> ScatterND into the page pool (in place) + Gather +
explicit attention, whose every row is computed alike whatever the step's other rows (a verification row of
speculative decoding gives the decode step's bits; onnxruntime's ``Attention`` kernel, 5-8 % faster, does not:
BENCHMARKS.md "Paged decode path"), then
fusions: residual add + RMSNorm into ``SkipSimplifiedLayerNormalization``; MatMuls that share their input
(q/k/v, gate/up) into one wide MatMul, whose q|k|v product GroupQueryAttention takes packed. The model is written as
``model.onnx`` with its weights in ``model.onnx.data`` (external data, 64-byte aligned so onnxruntime
can map it).
Encoders (BERT family) run their token-wise ops on the valid tokens only (``pack_encoder_tokens``).
"""
from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from ember.graphs.ir.graph import BLOCKS_META, TOKEN_EMBEDDING_META
from ember.graphs.nn.kv_cache import KVCacheStrategy

from ..passes.cleanup import remove_unused
from ..passes.fuse_parallel_matmuls import fuse_parallel_matmuls, pack_attention_qkv
from ..passes.fuse_skip_rms_norm import fuse_skip_rms_norm
from ..passes.lower_attention_gqa import lower_attention_to_gqa
from ..passes.lower_cached_attention_explicit import lower_cached_attention_explicit
from ..passes.lower_paged_attention import lower_paged_attention
from ..passes.quantize_embedding import quantize_embedding
from ..passes.quantize_matmuls import BLOCK_BITS, quantize_matmuls, weight_packer
from ..passes.quantize_matmuls_w8a8 import quantize_matmuls_w8a8
from ..passes.pack_encoder_tokens import pack_encoder_tokens
from .base import Progress, Target


#: onnxruntime session fusions that make this target's graphs slower, measured (onnxruntime 1.31, this 2-core
#: AVX2 machine, median of 7 x 20 runs): ``SkipLayerNormFusion`` turns an encoder's residual ``Add`` +
#: ``LayerNormalization`` into ``com.microsoft.SkipLayerNormalization``, whose CPU kernel takes 1.4-1.6 ms on
#: all-MiniLM-L6-v2's packed batch of 960 x 384 tokens where the two plain ops take 0.28-0.34 ms (2 threads;
#: 3.4 vs 0.5 ms on one), 12 times per batch. Decoders are not affected: ``fuse_skip_rms_norm`` emits their
#: ``SkipSimplifiedLayerNormalization`` itself (as fast as ``Add`` + ``RMSNormalization`` at decode).
SLOWER_FUSIONS = ("SkipLayerNormFusion",)


def write_onnx(model: ir.Model, rank_dir: Path, progress: Progress | None = None) -> list[Path]:
    """Write ``model.onnx`` + ``model.onnx.data``; ``progress(bytes)`` is called as tensors are written."""
    rank_dir.mkdir(parents=True, exist_ok=True)
    path = rank_dir / "model.onnx"

    def callback(tensor, info) -> None:
        if progress is not None:
            progress(tensor.nbytes)

    ir.save(model, path, external_data="model.onnx.data", callback=callback, alignment=64)
    files = [path]
    if (rank_dir / "model.onnx.data").exists():
        files.append(rank_dir / "model.onnx.data")
    return files


#: A GGUF token table in any of these block types is looked up in its blocks, whatever the encoding.
LOOKUP_BLOCKS = tuple(BLOCK_BITS)


def _gguf_token_table(value: ir.Value) -> bool:
    """A token-embedding table the checkpoint stores in blocks the lookup reads (:data:`LOOKUP_BLOCKS`)."""
    blocks = value.meta.get(BLOCKS_META)
    return bool(value.meta.get(TOKEN_EMBEDDING_META)) and blocks is not None and blocks.qtype in LOOKUP_BLOCKS


def _quantized(bits: int, keep_blocks: tuple[str, ...], symmetric: bool = True) -> tuple:
    """The passes of one weight encoding: every weight MatMul (and the tied head) -> MatMulNBits at ``bits``.

    A GGUF's own blocks of the ``keep_blocks`` types are kept as they are (``q8_0`` / ``q4_0`` keep only
    their own type; ``q4_1`` is the GGUF's own quantization: its Q4_0, Q4_1 and Q8_0 blocks, other weights
    asymmetric 4-bit RTN). A GGUF's token-embedding table is looked up in its own blocks with
    GatherBlockQuantized in every encoding (:data:`LOOKUP_BLOCKS`): the rows are the dequantized table's bit for
    bit, so the lookup is what a float table would give, at a quarter of float32's bytes or less (SmolLM2's Q8_0
    table in a q4_0 artifact: 108 MiB of float32 less). The tied head still follows the encoding. An RTN table
    stays float, since quantizing the lookup adds error (8-bit: tiny Llama's q8_0 logits 1.8e-2 -> 2.4e-2
    relative) where it saves no decode time."""
    return (quantize_matmuls(bits, keep_blocks, symmetric),
            quantize_embedding(weight_packer(8, LOOKUP_BLOCKS, only=_gguf_token_table,
                                             exact_rows=True)),
            remove_unused)


ORT_CPU = Target(
    name="ort-cpu",
    description="onnxruntime, CPU execution provider",
    passes=(lower_attention_to_gqa, lower_cached_attention_explicit, lower_paged_attention,
            fuse_skip_rms_norm, fuse_parallel_matmuls, pack_attention_qkv, remove_unused, pack_encoder_tokens),
    kv_strategies=(KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED),
    encodings=("float32", "q8_0", "q4_0", "q4_1", "q4_k", "w8a8"),
    encoding_passes={"q8_0": _quantized(8, ("Q8_0",)), "q4_0": _quantized(4, ("Q4_0",)),
                     "q4_1": _quantized(4, ("Q4_0", "Q4_1", "Q8_0"), symmetric=False),
                     "q4_k": _quantized(4, ("Q4_0", "Q4_1", "Q8_0", "Q4_K"), symmetric=False),
                     "w8a8": (quantize_matmuls_w8a8, remove_unused)},
    write=write_onnx,
    session={"disabled_optimizers": list(SLOWER_FUSIONS)},
)
