"""Lower ``ember.PagedAttention`` for onnxruntime CPU with one ``GroupQueryAttention`` per layer where the step allows.

The pool write and the read through the page table are ``lower_paged_attention``'s (RotaryEmbedding, ScatterND
in place, Gather into ``[batch, kv, max_len, hd]``). What differs is the attention over the gathered view: an
``If`` on a condition computed once per graph from the lengths chooses

* then: ``com.microsoft.GroupQueryAttention`` with the gathered keys / values as its past (BNSH, a buffer at
  least as long as every row), the new (rotated) k / v as key / value, ``seqlens_k = total - 1`` and
  ``total_sequence_length = max(total)``; rotary stays before the kernel because the pool must hold rotated keys;
* else: the explicit grouped attention (``explicit_attention.grouped_attention``), which takes any mix of rows.

The kernel derives each row's past as ``seqlens_k + 1 - sequence_length`` (or 0 in its first-prompt mode), so it is
right only for steps in the modes ``lower_attention_gqa`` lists: every row one token (decode, any mix of cache
lengths), a first prompt (every cache length 0, the longest row filling the step, rows right-padded), or rows
without padding when the batch is one row (a chunk after a cached prefix). Mixed steps (a prefill chunk next to
decodes, padding after a prefix) take the explicit branch, so one graph stays correct for every step the
scheduler forms. The condition is ``(max(cache) == 0 and max(input) == seq and min(input) >= 1) or
(min(input) == seq and (seq == 1 or batch == 1))``.

The past is a separate buffer from the kernel's present, so it copies each row's valid past into its present
(onnxruntime's CPU kernel does so once per query head); the pool itself is written only by the ScatterND. Where the
kernel rejects the heads (:func:`paged_gqa_rejection`: head size not a multiple of 8, query heads not a multiple of
the kv heads) the node stays for ``lower_paged_attention``, with the reason recorded.

Not in the ort-cpu target: on onnxruntime 1.32 CPU this form decodes slower than the explicit one (the ``If`` costs
a subgraph call per layer and step, and the copies above grow with batch x context), BENCHMARKS.md "Paged decode
path". It stays, tested, for a target or an onnxruntime whose kernel shares past and present, where it is the
shorter path; a target takes it by listing it before ``lower_paged_attention``.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.versions import EMBER_DOMAIN, MS_DOMAIN, MS_OPSET

from .base import nodes_of, replace_node
from .explicit_attention import attention_attributes, grouped_attention
from .lower_attention_gqa import gqa_heads_rejection
from .lower_paged_attention import PagedShared, write_and_read
from .lowering_record import Lowering, record_lowering, record_rejection

FORM = "ScatterND + Gather + If(GroupQueryAttention, explicit attention)"


def paged_gqa_rejection(node: ir.Node) -> str | None:
    """Why GroupQueryAttention (rotary outside it) cannot take ``node`` (an ``ember.PagedAttention``), or None."""
    attrs = attention_attributes(node)
    shape = node.inputs[3].shape
    return gqa_heads_rejection(int(attrs["num_heads"]), int(attrs["kv_num_heads"]),
                               shape[2] if shape is not None else None)


class _Shared(PagedShared):
    """:class:`PagedShared` plus the kernel's length inputs and the branch condition, once per graph."""

    def __init__(self, model: ir.Model, tape: ir.tape.Tape, node: ir.Node, page_size: int, prefix: str):
        super().__init__(model, tape, node, page_size, prefix)
        op, const = self.op, self.const
        i32 = ir.DataType.INT32
        self.seqlens_k = op("Cast", [op("Sub", [self.total_lengths, self.one])], {"to": i32},
                            name=f"{prefix}/seqlens_k")
        self.total_len = op("Cast", [op("ReduceMax", [self.total_lengths], {"keepdims": 0})], {"to": i32},
                            name=f"{prefix}/total_sequence_length")
        inputs = op("Sub", [self.total_lengths, self.cache_lengths])
        shortest = op("ReduceMin", [inputs], {"keepdims": 0})
        batch = op("Squeeze", [op("Shape", [node.inputs[6]], {"start": 0, "end": 1}), const(np.array([0]))])
        first_prompt = op("And", [
            op("And", [op("Equal", [op("ReduceMax", [self.cache_lengths], {"keepdims": 0}), self.zero]),
                       op("Equal", [op("ReduceMax", [inputs], {"keepdims": 0}), self.seq])]),
            op("GreaterOrEqual", [shortest, self.one])])
        unpadded = op("And", [op("Equal", [shortest, self.seq]),
                              op("Or", [op("Equal", [self.seq, self.one]), op("Equal", [batch, self.one])])])
        self.fits_kernel = op("Or", [first_prompt, unpadded], name=f"{prefix}/fits_group_query_attention")


def _branch(name: str, nodes: list[ir.Node], output: ir.Value) -> ir.Graph:
    """A subgraph of ``nodes``; its values are named under ``name`` (a subgraph's own automatic names would repeat
    the main graph's, which ONNX's single-assignment rule forbids across scopes)."""
    for i, node in enumerate(nodes):
        for j, value in enumerate(node.outputs):
            if not value.name:
                value.name = f"{name}/{i}_{j}"
    return ir.Graph(inputs=(), outputs=[output], nodes=nodes, name=name)


def _lower_one(node: ir.Node, tape: ir.tape.Tape, shared: _Shared) -> list[ir.Value]:
    read = write_and_read(node, shared)
    writes = read.writes
    attrs = attention_attributes(node)
    heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    window = int(attrs.get("sliding_window", 0))
    shared.mask(window, heads // kv_heads)  # built in the main graph: every layer's else-branch reads it
    dtype = node.inputs[0].dtype

    kernel = ir.tape.Tape()
    out, _, _ = kernel.op_multi_out(
        "GroupQueryAttention",
        [writes.query, writes.key, writes.value, read.keys, read.values, shared.seqlens_k, shared.total_len],
        {"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(attrs.get("scale", 0.0)),
         "softcap": float(attrs.get("softcap", 0.0)), "local_window_size": window if window > 0 else -1,
         "do_rotary": 0}, num_outputs=3, domain=MS_DOMAIN, name=f"{node.name}/GroupQueryAttention")
    explicit = ir.tape.Tape()
    shared.tape = explicit
    fallback = grouped_attention(shared, node, writes.query, read.keys, read.values, writes.head_dim)
    shared.tape = tape
    for value in (out, fallback):
        value.type = ir.TensorType(dtype)
    output = tape.op("If", [shared.fits_kernel],
                     {"then_branch": _branch(f"{node.name}/kernel", list(kernel.nodes), out),
                      "else_branch": _branch(f"{node.name}/explicit", list(explicit.nodes), fallback)},
                     name=f"{node.name}/attention")
    output.type = ir.TensorType(dtype)
    return [output, writes.key_out, writes.value_out]


def lower_paged_attention_gqa(model: ir.Model) -> ir.Model:
    """Each ``ember.PagedAttention`` whose heads the kernel takes gets the form above; the others stay, with the
    reason recorded, for ``lower_paged_attention``."""
    shared: dict[tuple, _Shared] = {}
    for node in nodes_of(model, "PagedAttention", EMBER_DOMAIN):
        reason = paged_gqa_rejection(node)
        if reason is not None:
            record_rejection(model, node, FORM, reason)
            continue
        tape = ir.tape.Tape()
        page_size = int(node.attributes["page_size"].value)
        key = (page_size, *(v.name for v in node.inputs[5:9]))  # page table, slot mapping, lengths
        if key not in shared:
            shared[key] = _Shared(model, tape, node, page_size, "/model/paged_gqa" + f"_{len(shared)}" * bool(shared))
        shared[key].tape = tape
        outputs = _lower_one(node, tape, shared[key])
        replace_node(model, node, list(tape.nodes), outputs)
        record_lowering(model, Lowering(node.name or "", "PagedAttention", FORM))
    if shared:
        model.graph.opset_imports[MS_DOMAIN] = MS_OPSET
    return model
