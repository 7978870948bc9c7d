"""``ort-cpu``: onnxruntime's CPU execution provider, the default target.

Lowering: ``ember.CachedAttention`` -> ``com.microsoft.GroupQueryAttention`` (in-place KV cache), then
fusions: residual add + RMSNorm into ``SkipSimplifiedLayerNormalization``; MatMuls that share their input
(q/k/v, gate/up) into one wide MatMul, whose q|k|v product GroupQueryAttention takes packed. The model is written as
``model.onnx`` with its weights in ``model.onnx.data`` (external data, 64-byte aligned so onnxruntime
can map it).
Encoders (BERT family) run their token-wise ops on the valid tokens only (``pack_encoder_tokens``).
"""
from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from ember.graphs.nn.kv_cache import KVCacheStrategy

from ..passes.cleanup import remove_unused
from ..passes.fuse_parallel_matmuls import fuse_parallel_matmuls, pack_attention_qkv
from ..passes.fuse_skip_rms_norm import fuse_skip_rms_norm
from ..passes.lower_attention_gqa import lower_attention_to_gqa
from ..passes.quantize_matmuls import quantize_matmuls
from ..passes.pack_encoder_tokens import pack_encoder_tokens
from .base import Progress, Target


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


ORT_CPU = Target(
    name="ort-cpu",
    description="onnxruntime, CPU execution provider",
    passes=(lower_attention_to_gqa, fuse_skip_rms_norm, fuse_parallel_matmuls, pack_attention_qkv, remove_unused,
            pack_encoder_tokens),
    kv_strategies=(KVCacheStrategy.CONTINUOUS,),
    encodings=("float32", "q8_0", "q4_0"),
    encoding_passes={"q8_0": (quantize_matmuls(8), remove_unused), "q4_0": (quantize_matmuls(4), remove_unused)},
    write=write_onnx,
)
