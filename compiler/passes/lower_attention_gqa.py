"""Lower ``ember.CachedAttention`` to ``com.microsoft.GroupQueryAttention`` (onnxruntime CPU and CUDA).

Where the kernel can take the node (:func:`gqa_rejection`): head sizes that are multiples of 16 run rotary inside
it; multiples of 8 only get a ``RotaryEmbedding`` before it (the kernel's rotary needs 16); others stay
``CachedAttention`` with the reason recorded, for ``lower_cached_attention_explicit`` to take.

GroupQueryAttention takes the total length minus one per row (``seqlens_k``) and the longest total length
(``total_sequence_length``); both are computed once per graph from ember's ``cache_lengths`` and
``input_lengths`` and shared by every layer. Rotary embedding moves into the kernel (``do_rotary`` with the
same cos/sin tables). The runtime binds each layer's ``past_key`` and ``present_key`` to one buffer, so the
kernel writes only the new tokens (past_present_share_buffer).

The kernel's modes bound what a batch may be: a first prompt (``cache_lengths`` all 0, rows right-padded),
one decode token per row (any mix of cache lengths), or one row of several tokens after a cached prefix.
The runtime forms batches within them.

Scale and soft-capping: the kernel's ``scale`` (0: ``1 / sqrt(head_size)``) and ``softcap`` (0: none; else
``softcap * tanh(scores / softcap)`` before the mask) mean what ember's attributes mean; onnxruntime 1.32's CPU
kernel applies both in all three modes, float and int8 caches alike (``tests/compiler/test_attention_softcap.py``
pins them against the reference), so neither is a reason to reject a node.

Window: in onnxruntime >= 1.31 GroupQueryAttention's ``local_window_size`` L lets a token attend to L positions,
itself included, which is ember's ``sliding_window`` (and transformers' ``kv_idx > q_idx - W``), so L = W.
(Older CPU kernels kept L + 1; ``tests/compiler/test_lowering.py`` pins the meaning against the
reference implementation.)

int8 KV cache (:func:`quantize_kv_cache`, ``CompileOptions.kv_cache_bit_width=8``): the kernel keeps past/present
as int8 and quantizes each new key/value as it writes it, ``clip(round_half_to_even(x / scale), -128, 127)``,
with static symmetric per-(kv head, channel) scales (inputs 12 and 13, ``k_scale``/``v_scale``, shape
``[1, kv_num_heads, 1, head_dim]``; attributes ``k_quant_type = v_quant_type = "PER_CHANNEL"``,
``kv_cache_bit_width = 8``). Attention, the prompt's included, reads the dequantized cache. The scales come
from ``ember.compiler.calibration.kv_cache``. It is a memory feature (a quarter of the float cache's bytes), not
a speed one: onnxruntime 1.31's CPU kernel attends over int8 more slowly (one layer at SmolLM2's shapes, 2
threads: a 1024-token prefill 4.5x, a decode step at 1k-4k tokens 1.2x the float cache's time). The kernel also has a 4-bit mode (uint8, two values per byte with
an offset of 8, ``head_dim / 2`` wide); ember does not offer it: with static per-channel scales, SmolLM2-135M
(float32 weights, five chat prompts) moves its logits by 37 % (median over positions, relative to the largest;
int8: 3 %) and keeps the top token at 67 % of the positions (int8: 97 %)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.versions import EMBER_DOMAIN, MS_DOMAIN, MS_OPSET

from .base import Pass, input_at, name_of, nodes_of, replace_node, static_dim
from .explicit_attention import SharedValues, rotate
from .lowering_record import Lowering, record_lowering, record_rejection


GQA_FORM = "GroupQueryAttention"
EXTERNAL_ROTARY_FORM = "RotaryEmbedding + GroupQueryAttention"


def gqa_rejection(node: ir.Node, *, rotary_in_kernel: bool = True) -> str | None:
    """Why onnxruntime's CPU GroupQueryAttention cannot run ``node`` (an ``ember.CachedAttention``), or None.

    The kernel's checks (``contrib_ops/cpu/bert/group_query_attention_helper.h``, ``CheckInputs``): the query
    heads a multiple of the kv heads; the head size a multiple of 8; with rotary in the kernel, the head size a
    multiple of 16 and the cos/sin tables' width (half the rotary dimension) a multiple of 8 and at most
    ``(head_size // 16) * 8``. ``tests/compiler/test_gqa_limits.py`` runs the kernel on a grid of shapes to keep
    this function and the installed onnxruntime in agreement."""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    past_key = input_at(node, 3)
    head_dim = past_key.shape[3] if past_key.shape is not None else None
    heads_rejected = gqa_heads_rejection(heads, kv_heads, head_dim)
    if heads_rejected is not None:
        return heads_rejected
    assert isinstance(head_dim, int)  # gqa_heads_rejection rejects any other
    cos = node.inputs[7] if len(node.inputs) > 7 else None
    if cos is not None and rotary_in_kernel:
        if head_dim % 16:
            return f"rotary in the kernel needs head_dim a multiple of 16, not {head_dim}"
        half = cos.shape[1] if cos.shape is not None else None
        if not isinstance(half, int) or half % 8 or half > (head_dim // 16) * 8:
            return (f"rotary in the kernel needs rotary_dim a multiple of 16 and at most {(head_dim // 16) * 16}, "
                    f"not {2 * half if isinstance(half, int) else half}")
    return None


def gqa_heads_rejection(heads: int, kv_heads: int, head_dim: object) -> str | None:
    """The kernel's limits on head counts and head size alone (rotary outside it), or None."""
    if not isinstance(head_dim, int):
        return "the KV cache's head_dim is not static"
    if heads % kv_heads:
        return f"num_heads ({heads}) must be a multiple of kv_num_heads ({kv_heads})"
    if head_dim % 8:
        return f"head_dim must be a multiple of 8, not {head_dim}"
    return None


def lower_attention_to_gqa(model: ir.Model) -> ir.Model:
    """Each ``ember.CachedAttention`` the kernel accepts becomes GroupQueryAttention (rotary inside it where it
    can, else a ``RotaryEmbedding`` before it); the others stay, with the reason recorded, for the next lowering."""
    shared: dict[tuple[str, str], tuple[ir.Value, ir.Value]] = {}
    rotary: dict[tuple[str, str], SharedValues] = {}
    lowered = False
    for node in nodes_of(model, "CachedAttention", EMBER_DOMAIN):
        query, key, value, past_key, past_value, cache_lengths, input_lengths = (input_at(node, i) for i in range(7))
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        cos, sin = (list(node.inputs[7:9]) + [None, None])[:2]
        rejected: tuple[str, ...] = ()
        in_kernel = gqa_rejection(node)
        if in_kernel is not None:
            without_rotary = gqa_rejection(node, rotary_in_kernel=False) if cos is not None else in_kernel
            if without_rotary is not None:
                record_rejection(model, node, GQA_FORM, without_rotary)
                continue
            rejected = (f"{GQA_FORM} with rotary in the kernel: {in_kernel}",)
        tape = ir.tape.Tape()
        lengths_key = (name_of(cache_lengths), name_of(input_lengths))
        if lengths_key not in shared:
            one = ir.Value(name=f"{node.name}/one", const_value=ir.tensor(np.array(1, dtype=np.int32)),
                           type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([]))
            model.graph.register_initializer(one)
            total = tape.op("Add", [cache_lengths, input_lengths], name=f"{node.name}/total_lengths")
            seqlens_k = tape.op("Sub", [total, one], name=f"{node.name}/seqlens_k")
            total_len = tape.op("ReduceMax", [total], {"keepdims": 0}, name=f"{node.name}/total_sequence_length")
            shared[lengths_key] = (seqlens_k, total_len)
        seqlens_k, total_len = shared[lengths_key]
        if rejected:  # rotate q and k before the kernel, which then runs without its rotary
            if lengths_key not in rotary:
                rotary[lengths_key] = SharedValues(model, tape, f"/model/rotary_{len(rotary)}", cache_lengths,
                                                   input_lengths)
                op = rotary[lengths_key].op
                rotary[lengths_key].start(op("Squeeze", [op("Shape", [query], {"start": 1, "end": 2}),
                                                         rotary[lengths_key].const(np.array([0]))]))
            rotary[lengths_key].tape = tape
            query, key = rotate(rotary[lengths_key], node, query, key, cos, sin, static_dim(past_key, 3))
            cos = sin = None
        window = int(attrs.get("sliding_window", 0))
        gqa_attrs = {
            "num_heads": int(attrs["num_heads"]),
            "kv_num_heads": int(attrs["kv_num_heads"]),
            "scale": float(attrs.get("scale", 0.0)),
            "softcap": float(attrs.get("softcap", 0.0)),
            "local_window_size": window if window > 0 else -1,
            "do_rotary": int(cos is not None),
            "rotary_interleaved": int(attrs.get("rotary_interleaved", 0)),
        }
        outputs = tape.op_multi_out(
            "GroupQueryAttention",
            [query, key, value, past_key, past_value, seqlens_k, total_len, cos, sin],
            gqa_attrs, num_outputs=3, domain=MS_DOMAIN, name=f"{node.name}/GroupQueryAttention")
        replace_node(model, node, list(tape.nodes), list(outputs))
        record_lowering(model, Lowering(node.name or "", "CachedAttention",
                                        EXTERNAL_ROTARY_FORM if rejected else GQA_FORM, rejected))
        lowered = True
    if lowered:
        model.graph.opset_imports[MS_DOMAIN] = MS_OPSET
    return model


# KV cache bit widths (besides 0: float) that a target lowering attention with this pass can keep.
KV_CACHE_BIT_WIDTHS = (8,)
_GQA_INPUTS = 14  # ... position_ids, attention_bias, head_sink, k_scale (12), v_scale (13)


def kv_cache_bit_widths(passes: Sequence[Pass]) -> tuple[int, ...]:
    """The integer KV cache widths a target with ``passes`` supports: GroupQueryAttention's where it lowers to it."""
    return KV_CACHE_BIT_WIDTHS if lower_attention_to_gqa in passes else ()


@dataclass(frozen=True)
class GQAKVCache:
    """One GroupQueryAttention's cache: graph input/output names and layout."""

    node: ir.Node
    key: str
    value: str
    present_key: str
    present_value: str
    kv_num_heads: int
    head_dim: int
    rotary_dim: int  # 0: no rotary in the kernel
    rotary_interleaved: bool


def _past_cache(node: ir.Node, index: int) -> ir.Value:
    """Input ``index`` of a GroupQueryAttention, checked to be a past KV cache the runtime can bind."""
    past = node.inputs[index]
    if past is None or not past.is_graph_input() or len(past.uses()) != 1:
        raise ValueError(f"{node.name}: the KV cache is not a graph input used by this node alone")
    return past


def gqa_kv_caches(model: ir.Model) -> list[GQAKVCache]:
    """The lowered graph's GroupQueryAttention caches, in graph order; each past is a graph input read by that
    node alone and each present a graph output (what the runtime binds)."""
    caches = []
    for node in nodes_of(model, "GroupQueryAttention", MS_DOMAIN):
        past_key, past_value = _past_cache(node, 3), _past_cache(node, 4)
        present_key, present_value = node.outputs[1], node.outputs[2]
        for present in (present_key, present_value):
            if not present.is_graph_output():
                raise ValueError(f"{node.name}: the present KV cache is not a graph output")
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        head_dim = static_dim(past_key, 3)
        cos = node.inputs[7] if len(node.inputs) > 7 else None
        rotary_dim = 0
        if attrs.get("do_rotary", 0):
            half = cos.shape[1] if cos is not None and cos.shape is not None else None
            rotary_dim = 2 * half if isinstance(half, int) else head_dim
        caches.append(GQAKVCache(node, name_of(past_key), name_of(past_value), name_of(present_key),
                                 name_of(present_value), int(attrs["kv_num_heads"]), head_dim, rotary_dim,
                                 bool(attrs.get("rotary_interleaved", 0))))
    return caches


def quantize_kv_cache(model: ir.Model, bit_width: int, scales: Mapping[str, np.ndarray]) -> ir.Model:
    """Keep every GroupQueryAttention's KV cache in int8 with the given dequantization scales.

    ``scales`` maps each past-KV graph input name to its ``[kv_num_heads, head_dim]`` scales. The past inputs
    and present outputs become int8 (the runtime allocates what the graph inputs say) and each scale an
    initializer named after its cache (``past_key_values.0.key.scale``).
    """
    if bit_width not in KV_CACHE_BIT_WIDTHS:
        raise ValueError(f"GroupQueryAttention KV cache: bit width {bit_width} is not supported; supported: "
                         f"{', '.join(map(str, KV_CACHE_BIT_WIDTHS))}")
    caches = gqa_kv_caches(model)
    if not caches:
        raise ValueError("the graph has no attention with a KV cache to quantize")
    for cache in caches:
        node = cache.node
        scale_values = []
        for name in (cache.key, cache.value):
            scale = np.asarray(scales[name], dtype=np.float32)
            if scale.shape != (cache.kv_num_heads, cache.head_dim) or not np.all(np.isfinite(scale) & (scale > 0)):
                raise ValueError(f"{name}: scales must be positive and finite, shaped "
                                 f"({cache.kv_num_heads}, {cache.head_dim}); got {scale.shape}")
            per_head = scale.reshape(1, cache.kv_num_heads, 1, cache.head_dim)
            tensor = ir.tensor(per_head, name=f"{name}.scale")
            value = ir.Value(name=f"{name}.scale", const_value=tensor, type=ir.TensorType(ir.DataType.FLOAT),
                             shape=ir.Shape(per_head.shape))
            model.graph.register_initializer(value)
            scale_values.append(value)
        if len(node.inputs) < _GQA_INPUTS:
            node.resize_inputs(_GQA_INPUTS)
        node.replace_input_with(12, scale_values[0])
        node.replace_input_with(13, scale_values[1])
        for attr in (ir.AttrString("k_quant_type", "PER_CHANNEL"), ir.AttrString("v_quant_type", "PER_CHANNEL"),
                     ir.AttrInt64("kv_cache_bit_width", bit_width)):
            node.attributes[attr.name] = attr
        for value in (input_at(node, 3), input_at(node, 4), node.outputs[1], node.outputs[2]):
            value.type = ir.TensorType(ir.DataType.INT8)
    return model
