"""Lower ``ember.PagedAttention`` to onnxruntime's ``com.microsoft.PagedAttention`` (the CUDA execution provider's).

The contrib op takes the batch's real tokens packed (no padding) with ``cumulative_sequence_length``, where
ember's rows are right-padded ``[batch, seq, ...]`` with ``input_lengths``. Per graph, computed once from the
lengths and shared by every layer:

* ``token_index`` ``[tokens]``: the flat ``batch * seq`` positions of the real tokens (``NonZero`` of
  ``i < input_lengths[b]``); each layer's q|k|v are gathered there (``Gather`` on ``[batch * seq, width]``), and so
  is the slot mapping (cast to int32: the op's ``S``).
* ``cumulative_sequence_length`` = ``[0, cumsum(input_lengths)]``; ``past_seqlens`` = ``cache_lengths``;
  ``block_table`` = ``page_table`` (padding entries are page 0, which no position below a row's length reads).
* ``repad_index`` ``[batch, seq]``: the packed token each padded position reads back, ``c[b] + min(i, len[b] - 1)``
  (padding positions repeat their row's last token: ember leaves their outputs unspecified).

The cache: the kernel reads and writes ``key_cache`` ``[num_blocks, block_size, kv, head_size]`` in place and
refuses a ``key_cache_out`` that is not the same buffer (``paged_attention.cc``: "key_cache and key_cache_out must
be the same buffer"; its kernel declares no ``MayInplace``/``Alias``). So no ``Reshape`` may sit between the graph
input and the op: the lowered graph's cache inputs and outputs become 4-D, ``[num_pages, page_size, kv, head_dim]``
-- the same bytes as ember's ``[num_pages * page_size, kv, head_dim]`` pool. The runtime binds a 4-D view of its
pool buffer as both input and output.

Limits (:func:`paged_attention_contrib_rejection`; each rejected node stays ``ember.PagedAttention`` for
``lower_paged_attention``): ``head_size`` a multiple of 8 (``paged_attention_helper.h``, ``Check_Q_K_V``);
``block_size`` a power of two >= 16 (``CheckKVCache``); rotary in the kernel as GroupQueryAttention's
(``CheckRotaryCaches``: head size a multiple of 16, half the rotary dimension a multiple of 8 and at most
``(head_size / 16) * 8``), else a ``RotaryEmbedding`` before the op; no sliding window (the kernel's
``local_window_size`` meaning is not pinned by a test here: without a GPU it cannot be run against the
reference). The kernel takes float16 and bfloat16 activations only (type constraint ``T``), so a float32 graph is
never given to this pass (the ort-cuda target lowers float32 to the explicit form): the lowered node's type is
set by :func:`~ember.compiler.passes.convert_to_half.convert_to_half`, which runs after it.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.versions import EMBER_DOMAIN, MS_DOMAIN, MS_OPSET

from .base import input_at, nodes_of, replace_node, static_dim
from .explicit_attention import SharedValues, rotate
from .lower_attention_gqa import gqa_heads_rejection
from .lowering_record import Lowering, record_lowering, record_rejection

FORM = "com.microsoft.PagedAttention"
EXTERNAL_ROTARY_FORM = "RotaryEmbedding + com.microsoft.PagedAttention"


def paged_attention_contrib_rejection(node: ir.Node, *, rotary_in_kernel: bool = True) -> str | None:
    """Why the CUDA ``com.microsoft.PagedAttention`` cannot take ``node`` (an ``ember.PagedAttention``), or None."""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    heads, kv_heads, page_size = int(attrs["num_heads"]), int(attrs["kv_num_heads"]), int(attrs["page_size"])
    key_cache = input_at(node, 3)
    head_dim = key_cache.shape[2] if key_cache.shape is not None else None
    heads_rejected = gqa_heads_rejection(heads, kv_heads, head_dim)
    if heads_rejected is not None:
        return heads_rejected
    assert isinstance(head_dim, int)  # gqa_heads_rejection rejects any other
    if page_size < 16 or page_size & (page_size - 1):
        return f"the page size (block_size) must be a power of two >= 16, not {page_size}"
    if int(attrs.get("sliding_window", 0)) > 0:
        return "sliding windows are not lowered to it (local_window_size's meaning is untested here)"
    cos = node.inputs[9] if len(node.inputs) > 9 else None
    if cos is not None and rotary_in_kernel:
        if head_dim % 16:
            return f"rotary in the kernel needs head_dim a multiple of 16, not {head_dim}"
        half = cos.shape[1] if cos.shape is not None else None
        if not isinstance(half, int) or half % 8 or half > (head_dim // 16) * 8:
            return (f"rotary in the kernel needs rotary_dim a multiple of 16 and at most {(head_dim // 16) * 16}, "
                    f"not {2 * half if isinstance(half, int) else half}")
    return None


class _Packing(SharedValues):
    """Per graph: the real tokens' flat positions, the lengths as the op wants them, and the way back."""

    def __init__(self, model: ir.Model, tape: ir.tape.Tape, node: ir.Node, prefix: str):
        page_table, slot_mapping, cache_lengths, input_lengths = (input_at(node, i) for i in range(5, 9))
        super().__init__(model, tape, prefix, cache_lengths, input_lengths)
        op, const, i32 = self.op, self.const, ir.DataType.INT32
        # seq from the slot mapping, not the query: q|k|v stay read by the attention alone (packed QKV)
        seq = op("Squeeze", [op("Shape", [slot_mapping], {"start": 1, "end": 2}), const(np.array([0]))])
        self.start(seq)  # positions [batch, seq], for an external rotary
        steps = op("Range", [self.zero, seq, self.one])  # [seq]
        lengths = op("Cast", [input_lengths], {"to": ir.DataType.INT64})
        valid = op("Less", [op("Unsqueeze", [steps, const(np.array([0]))]),
                            op("Unsqueeze", [lengths, const(np.array([1]))])])  # [batch, seq]
        flat = op("Reshape", [valid, const(np.array([-1], np.int64))])
        self.token_index = op("Reshape", [op("NonZero", [flat]), const(np.array([-1], np.int64))],
                              name=f"{prefix}/token_index")
        ends = op("CumSum", [input_lengths, const(np.array(0, np.int32))])
        self.cumulative = op("Concat", [const(np.array([0], np.int32)), ends], {"axis": 0},
                             name=f"{prefix}/cumulative_sequence_length")
        self.past_seqlens = cache_lengths
        self.block_table = page_table
        self.slots = op("Cast", [self.gather(slot_mapping, None)], {"to": i32}, name=f"{prefix}/slot_mapping")
        starts = op("Cast", [op("Sub", [ends, input_lengths])], {"to": ir.DataType.INT64})
        last = op("Max", [op("Sub", [lengths, self.one]), self.zero])
        within = op("Min", [op("Unsqueeze", [steps, const(np.array([0]))]), op("Unsqueeze", [last, const(np.array([1]))])])
        self.repad_index = op("Add", [op("Unsqueeze", [starts, const(np.array([1]))]), within],
                              name=f"{prefix}/repad_index")  # [batch, seq]

    def gather(self, padded: ir.Value, width: int | None) -> ir.Value:
        """The real tokens of ``padded`` ``[batch, seq(, width)]``: ``[tokens(, width)]``."""
        shape = [-1] if width is None else [-1, width]
        return self.op("Gather", [self.op("Reshape", [padded, self.const(np.array(shape, np.int64))]),
                                  self.token_index], {"axis": 0})


def _packed_qkv(query: ir.Value, key: ir.Value, value: ir.Value) -> ir.Value | None:
    """The fused q|k|v product, when q, k and v are the three outputs of its Split and read by this node alone."""
    split = query.producer() if query is not None else None
    if split is None or split.op_type != "Split" or split.domain != "" or len(split.outputs) != 3:
        return None
    if list(split.outputs) != [query, key, value] or any(len(list(o.uses())) != 1 for o in split.outputs):
        return None
    return split.inputs[0]


def _lower_one(node: ir.Node, tape: ir.tape.Tape, packing: _Packing,
               rotary_in_kernel: bool) -> list[ir.Value]:
    query, key, value, key_cache, value_cache = (input_at(node, i) for i in range(5))
    cos, sin = (list(node.inputs[9:11]) + [None, None])[:2]
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    heads, kv_heads, page_size = int(attrs["num_heads"]), int(attrs["kv_num_heads"]), int(attrs["page_size"])
    head_dim = static_dim(key_cache, 2)
    if not rotary_in_kernel:
        query, key = rotate(packing, node, query, key, cos, sin, head_dim)
        cos = sin = None
    packed = _packed_qkv(query, key, value)  # the Split it came from goes with remove_unused
    if packed is not None:
        inputs = [packing.gather(packed, (heads + 2 * kv_heads) * head_dim), None, None]
    else:
        inputs = [packing.gather(query, heads * head_dim), packing.gather(key, kv_heads * head_dim),
                  packing.gather(value, kv_heads * head_dim)]
    for cache in (key_cache, value_cache):  # the kernel's own layout, bound by the runtime (see the module doc)
        cache.shape = ir.Shape([_pages_dim(cache), page_size, kv_heads, head_dim])
    window = int(attrs.get("sliding_window", 0))
    contrib_attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(attrs.get("scale", 0.0)),
                     "softcap": float(attrs.get("softcap", 0.0)), "do_rotary": int(cos is not None),
                     "rotary_interleaved": int(attrs.get("rotary_interleaved", 0))}
    if window > 0:
        contrib_attrs["local_window_size"] = window
    out, key_out, value_out = tape.op_multi_out(
        "PagedAttention",
        inputs + [key_cache, value_cache, packing.cumulative, packing.past_seqlens, packing.block_table, cos, sin,
                  packing.slots],
        contrib_attrs, num_outputs=3, domain=MS_DOMAIN, name=f"{node.name}/PagedAttention")
    output = tape.op("Gather", [out, packing.repad_index], {"axis": 0}, name=f"{node.name}/repad")
    return [output, key_out, value_out]


def _pages_dim(cache: ir.Value) -> str | int:
    rows = cache.shape[0] if cache.shape is not None else None
    return "num_pages" if not isinstance(rows, int) else rows


def lower_paged_attention_contrib(model: ir.Model) -> ir.Model:
    """Each ``ember.PagedAttention`` the kernel accepts becomes ``com.microsoft.PagedAttention`` (rotary inside it
    where it can, else a ``RotaryEmbedding`` before it); the others stay, with the reason recorded."""
    shared: dict[tuple, _Packing] = {}
    lowered = False
    for node in nodes_of(model, "PagedAttention", EMBER_DOMAIN):
        in_kernel = paged_attention_contrib_rejection(node)
        rejected: tuple[str, ...] = ()
        if in_kernel is not None:
            has_rotary = len(node.inputs) > 9 and node.inputs[9] is not None
            without = paged_attention_contrib_rejection(node, rotary_in_kernel=False) if has_rotary else in_kernel
            if without is not None:
                record_rejection(model, node, FORM, without)
                continue
            rejected = (f"{FORM} with rotary in the kernel: {in_kernel}",)
        tape = ir.tape.Tape()
        key = tuple(input_at(node, i).name for i in range(5, 9))  # page table, slot mapping, lengths
        if key not in shared:
            prefix = "/model/paged_attention_contrib" + f"_{len(shared)}" * bool(shared)
            shared[key] = _Packing(model, tape, node, prefix)
        shared[key].tape = tape
        outputs = _lower_one(node, tape, shared[key], rotary_in_kernel=not rejected)
        cache_shapes = [input_at(node, 3).shape, input_at(node, 4).shape]
        replace_node(model, node, list(tape.nodes), outputs)
        for value, shape in zip(outputs[1:], cache_shapes):  # replace_node gave them the 3-D pool's shape
            value.shape = shape
        record_lowering(model, Lowering(node.name or "", "PagedAttention",
                                        EXTERNAL_ROTARY_FORM if rejected else FORM, rejected))
        lowered = True
    if lowered:
        model.graph.opset_imports[MS_DOMAIN] = MS_OPSET
    return model
