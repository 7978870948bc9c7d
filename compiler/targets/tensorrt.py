"""``tensorrt``: a TensorRT engine per GPU, built from a graph of standard ONNX ops that TensorRT's parser takes.

The artifact is ``model.onnx`` + external data, as for onnxruntime; the runtime backend ``tensorrt`` builds the
engine from it on the device (``compiler/tensorrt_engine``). So this target's job is the graph: every op must be
one that TensorRT's ONNX parser imports (:mod:`.tensorrt_support`: the 10.1 parser's table, opsets 9-20), and the
graph must mean exactly what the high-level one does. Lowering:

* ``ember.CachedAttention`` (CONTINUOUS) -> ScatterND of the new K/V into the slot ``[slots, kv, max_len, hd]`` +
  explicit attention (``lower_cached_attention_explicit``); ``ember.PagedAttention`` (PAGED) -> ScatterND into the
  page pool + Gather through the page table + explicit attention (``lower_paged_attention``). Each node's record
  says why not onnxruntime's fused kernels: they are ``com.microsoft`` contrib ops, which have no TensorRT importer
  or plugin.
* What those lowerings and the layers emit past opset 20 is rewritten with the same meaning: ``RotaryEmbedding``
  (23) by ``decompose_rotary`` (Gather of the cos/sin tables, Slice, Mul/Add, Concat), ``RMSNormalization`` (23)
  by ``decompose_rms_norm`` (its ONNX function body), the encoders' ``Attention`` (23) by ``decompose_attention``
  (MatMul, Softmax, MatMul), and an integer ``CumSum`` (RoBERTa's positions; TensorRT's takes floats) by
  ``cumsum_in_float``. onnxruntime's fusions (``SkipSimplifiedLayerNormalization``,
  packed q|k|v for GroupQueryAttention) are not applied: contrib ops; TensorRT fuses on its own.
* **float16**: the graph in half (``convert_to_half``: weights, activations and the KV cache; norms' statistics and
  softmax in float32, logits cast back to float32), then the rewrites above, so that they keep those float32
  islands; the engine is built with TensorRT's FP16 flag (``tensorrt_engine.ensure_engine``).
* **q4_0**: weight-only INT4 as standard blocked ``DequantizeLinear`` + ``MatMul``, positive scales, only where the
  parser reads the blocks as written (``quantize_matmuls_qdq_tensorrt``; other weights stay float32, recorded).
* Last, :func:`check_parser_support`: an ember op left over, or any op, type or checked restriction the table
  refuses, fails the compile with the op named. A graph this target writes that TensorRT cannot parse is a bug
  here, found at compile time, not when the engine is built on a GPU.

Opset: the graph keeps ember's ai.onnx 23 import. The parser does not refuse newer imports (it records the version
and its importers only branch on ``>= N``); of the ops this target emits, only ``DequantizeLinear`` changed meaning
after 20 (opset 21's ``block_size``, which the 10.1 parser ignores, inferring the block from the shapes: checked),
the others only gained types. Lowering the import to 20 would make the blocked INT4 form invalid ONNX (onnxruntime,
which runs this graph in the tests, refuses it), so it is kept.

Paged attention: the standard-op form (ScatterND into the pool, Gather through the page table), not a plugin.
TensorRT-LLM's paged-attention plugin belongs to TensorRT-LLM (its own KV-cache layout and manager, its own network
builder and version pins), not to TensorRT's parser; the native attention / KV-cache layers of later TensorRT
releases have no ONNX op in the pinned parser. This form parses with TensorRT 10 as it is, and its meaning is
tested here by running this very graph on onnxruntime (``tests/reference/test_gpu_graph_forms_tensorrt.py``). Its
cost, honestly: a TensorRT ScatterND writes a new output tensor, and TensorRT does not promise to alias a layer's
input with its output. The runtime therefore binds the **same device address** to ``key_cache.{i}`` and
``key_cache_out.{i}`` (``runtime/backends/tensorrt.py`` does); ScatterND then copies the pool onto itself and writes
the new rows, so the result is right, but the copy still moves the whole pool each step -- O(pool) bytes per layer
and K/V per step, not O(new tokens) as on onnxruntime, whose ScatterND skips the copy when the pointers are equal.
The risk: TensorRT treating a network input as read-only is not documented either way; were it to reorder or
stage the scatter so that it reads the input after writing the output, a step would see stale K/V. Only a GPU run
(the end-to-end script) can confirm it; the fix, if not, is two pools swapped per step (O(pool) copy, correct), and
the fast path is the plugin or native layers named above. The CONTINUOUS form's ScatterND into the slot is the same.
"""
from __future__ import annotations

import onnx_ir as ir

from ember.graphs.ir.versions import EMBER_DOMAIN
from ember.graphs.nn.kv_cache import KVCacheStrategy

from ..passes.base import nodes_of
from ..passes.cleanup import remove_unused
from ..passes.convert_to_half import convert_to_half
from ..passes.cumsum_in_float import cumsum_in_float
from ..passes.decompose_attention import decompose_attention
from ..passes.decompose_rms_norm import decompose_rms_norm
from ..passes.decompose_rotary import decompose_rotary
from ..passes.lower_attention_gqa import GQA_FORM
from ..passes.lower_cached_attention_explicit import lower_cached_attention_explicit
from ..passes.lower_paged_attention import lower_paged_attention
from ..passes.lower_paged_attention_contrib import FORM as PAGED_CONTRIB_FORM
from ..passes.lowering_record import record_rejection, refuse_unlowered
from ..passes.quantize_matmuls_qdq_tensorrt import quantize_matmuls_int4_tensorrt
from .base import Target
from .ort_cpu import write_onnx
from .tensorrt_support import require_tensorrt_graph

NO_CONTRIB_OPS = "an onnxruntime contrib op: TensorRT has no importer or plugin for it"


def reject_contrib_attention(model: ir.Model) -> ir.Model:
    """Record, for each attention node, why it does not get onnxruntime's fused kernel here."""
    for node in nodes_of(model, "CachedAttention", EMBER_DOMAIN):
        record_rejection(model, node, GQA_FORM, NO_CONTRIB_OPS)
    for node in nodes_of(model, "PagedAttention", EMBER_DOMAIN):
        record_rejection(model, node, PAGED_CONTRIB_FORM, NO_CONTRIB_OPS)
    return model


def check_parser_support(model: ir.Model) -> ir.Model:
    """The last pass: refuse any ember op no lowering took, then anything TensorRT's parser table refuses."""
    refuse_unlowered(model, "tensorrt")
    require_tensorrt_graph(model)
    return model


#: The ops past opset 20 rewritten by their standard meaning, then the parser check. After the precision pass in
#: float16, so that the norms' statistics (``stash_type``) and the softmax (``softmax_precision``) stay float32.
STANDARD_OPS_ONLY = (decompose_rotary, decompose_rms_norm, decompose_attention, cumsum_in_float, remove_unused,
                     check_parser_support)

TENSORRT = Target(
    name="tensorrt",
    description="TensorRT engine built from standard ONNX ops (parser table 10.1)",
    passes=(reject_contrib_attention, lower_cached_attention_explicit, lower_paged_attention, remove_unused),
    kv_strategies=(KVCacheStrategy.CONTINUOUS, KVCacheStrategy.PAGED),
    encodings=("float32", "float16", "q4_0"),
    encoding_passes={"float32": STANDARD_OPS_ONLY,
                     "float16": (convert_to_half(ir.DataType.FLOAT16), *STANDARD_OPS_ONLY),
                     "q4_0": (quantize_matmuls_int4_tensorrt(), *STANDARD_OPS_ONLY)},
    write=write_onnx,
    device_kind="cuda",
    runtime="tensorrt",
    providers=("TensorrtExecutionProvider", "CUDAExecutionProvider"),
)
