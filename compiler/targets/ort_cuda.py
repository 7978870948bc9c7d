"""``ort-cuda``: onnxruntime's CUDA execution provider (onnxruntime-gpu), checked statically here (no GPU).

The same artifact form as ``ort-cpu`` (``model.onnx`` + external data), lowered for the kernels CUDA registers,
whose limits were read in onnxruntime's source (1.32; paths under ``onnxruntime/``):

* ``com.microsoft.GroupQueryAttention`` (CONTINUOUS) and ``com.microsoft.PagedAttention`` (PAGED) register
  ``MLFloat16`` and ``BFloat16`` activations only (``contrib_ops/cuda/bert/group_query_attention.cc``,
  ``paged_attention.cc``: ``REGISTER_KERNEL_TYPED``). A float32 node would be placed on the CPU provider, with
  the whole KV cache copied across each step; so **float32** lowers attention to standard ops, which CUDA runs
  (ScatterND into the cache in place + explicit attention, or the paged ScatterND + Gather form), and the half
  encodings use the fused kernels.
* GroupQueryAttention's shape checks are the shared ``contrib_ops/cpu/bert/group_query_attention_helper.h``
  (``lower_attention_gqa.gqa_rejection``: head size a multiple of 8; rotary in the kernel needs 16). Its CUDA
  backends add: flash attention for head sizes <= 256 (multiples of 8, SM80+;
  ``bert/flash_attention/flash_api.cc``, ``is_supported``), else memory-efficient attention (multiples of 8 up to
  ``kEfficientAttentionMaxHeadSize``; bfloat16 only on SM80+; ``cutlass_fmha/memory_efficient_attention.h``).
  Every head size ember's architectures have (<= 256) is covered by one of them. Shapes the helper rejects fall
  back to ``lower_cached_attention_explicit``, recorded per node.
* PagedAttention's checks (``contrib_ops/cpu/bert/paged_attention_helper.h``) are in
  ``lower_paged_attention_contrib``; rejected nodes fall back to ``lower_paged_attention``.
* ``MatMulNBits`` (**q4_0**) registers float, float16 and bfloat16 ``A`` on CUDA
  (``contrib_ops/cuda/quantization/matmul_nbits.cc``); its scales are ``T1``, the activations' type, so q4_0 runs
  in float16 (the passes quantize first, then ``convert_to_half`` turns the scales half too). The fast
  fpA_intB GEMM path wants float16/bfloat16 ``A``, block size 32/64/128 and ``N`` a multiple of 64 (4-bit); other
  shapes run the generic kernel. ``accuracy_level`` is a CPU setting that CUDA ignores.
* Fusions kept: residual add + RMSNorm -> ``SkipSimplifiedLayerNormalization`` (CUDA: float, float16, bfloat16;
  statistics in float32) and the q|k|v / gate|up MatMul fusion with GroupQueryAttention's packed-QKV mode
  (``Check_QKV``; PagedAttention takes the packed product too).

float16 / bfloat16: :func:`~ember.compiler.passes.convert_to_half.convert_to_half` after the lowering (it keeps
Softmax islands, norm statistics and the returned logits in float32; the KV cache becomes half).
"""
from __future__ import annotations

import onnx_ir as ir

from ember.graphs.ir.versions import EMBER_DOMAIN
from ember.graphs.nn.kv_cache import KVCacheStrategy

from ..passes.base import nodes_of
from ..passes.cleanup import remove_unused
from ..passes.convert_to_half import convert_to_half
from ..passes.fuse_parallel_matmuls import fuse_parallel_matmuls, pack_attention_qkv
from ..passes.fuse_skip_rms_norm import fuse_skip_rms_norm
from ..passes.lower_attention_gqa import GQA_FORM, lower_attention_to_gqa
from ..passes.lower_cached_attention_explicit import lower_cached_attention_explicit
from ..passes.lower_paged_attention import lower_paged_attention
from ..passes.lower_paged_attention_contrib import FORM as PAGED_CONTRIB_FORM, lower_paged_attention_contrib
from ..passes.lowering_record import record_rejection
from ..passes.pack_encoder_tokens import pack_encoder_tokens
from ..passes.quantize_matmuls import quantize_matmuls
from .base import Target
from .ort_cpu import write_onnx

HALF_ONLY = "onnxruntime's CUDA kernel takes float16/bfloat16 activations only"


def reject_fused_attention_in_float32(model: ir.Model) -> ir.Model:
    """Record, for each attention node of a float32 compile, why it does not get the fused CUDA kernel."""
    for node in nodes_of(model, "CachedAttention", EMBER_DOMAIN):
        record_rejection(model, node, GQA_FORM, HALF_ONLY)
    for node in nodes_of(model, "PagedAttention", EMBER_DOMAIN):
        record_rejection(model, node, PAGED_CONTRIB_FORM, HALF_ONLY)
    return model


def _half(dtype: ir.DataType, *quantize) -> tuple:
    """The passes of one half encoding: fused attention kernels, packed QKV, weights, then the precision."""
    return (lower_attention_to_gqa, lower_cached_attention_explicit, lower_paged_attention_contrib,
            lower_paged_attention, pack_attention_qkv, *quantize, remove_unused, pack_encoder_tokens,
            convert_to_half(dtype))


ORT_CUDA = Target(
    name="ort-cuda",
    description="onnxruntime, CUDA execution provider",
    passes=(fuse_skip_rms_norm, fuse_parallel_matmuls),
    kv_strategies=(KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED),
    encodings=("float32", "float16", "bfloat16", "q4_0"),
    encoding_passes={
        "float32": (reject_fused_attention_in_float32, lower_cached_attention_explicit, lower_paged_attention,
                    remove_unused, pack_encoder_tokens),
        "float16": _half(ir.DataType.FLOAT16),
        "bfloat16": _half(ir.DataType.BFLOAT16),
        "q4_0": _half(ir.DataType.FLOAT16, quantize_matmuls(4, ("Q4_0",))),
    },
    write=write_onnx,
    device_kind="cuda",
    runtime="onnxruntime-cuda",
    providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
)
