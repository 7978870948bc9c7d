"""Lower ``ember.CachedAttention`` to ``com.microsoft.GroupQueryAttention`` (onnxruntime CPU and CUDA).

GroupQueryAttention takes the total length minus one per row (``seqlens_k``) and the longest total length
(``total_sequence_length``); both are computed once per graph from ember's ``cache_lengths`` and
``input_lengths`` and shared by every layer. Rotary embedding moves into the kernel (``do_rotary`` with the
same cos/sin tables). The runtime binds each layer's ``past_key`` and ``present_key`` to one buffer, so the
kernel writes only the new tokens (past_present_share_buffer).

The kernel's modes bound what a batch may be: a first prompt (``cache_lengths`` all 0, rows right-padded),
one decode token per row (any mix of cache lengths), or one row of several tokens after a cached prefix.
The runtime forms batches within them.

Window: in onnxruntime >= 1.31 GroupQueryAttention's ``local_window_size`` L lets a token attend to L positions,
itself included, which is ember's ``sliding_window`` (and transformers' ``kv_idx > q_idx - W``), so L = W.
(Older CPU kernels kept L + 1; ``tests/compiler/test_lower_attention.py`` pins the meaning against the
reference implementation.)
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ember.graphs.ir.versions import EMBER_DOMAIN, MS_DOMAIN, MS_OPSET

from .base import nodes_of, replace_node


def lower_attention_to_gqa(model: ir.Model) -> ir.Model:
    shared: dict[tuple[str, str], tuple[ir.Value, ir.Value]] = {}
    lowered = False
    for node in nodes_of(model, "CachedAttention", EMBER_DOMAIN):
        query, key, value, past_key, past_value, cache_lengths, input_lengths, *rotary = node.inputs
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        tape = ir.tape.Tape()
        lengths_key = (cache_lengths.name, input_lengths.name)
        if lengths_key not in shared:
            one = ir.Value(name=f"{node.name}/one", const_value=ir.tensor(np.array(1, dtype=np.int32)),
                           type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([]))
            model.graph.register_initializer(one)
            total = tape.op("Add", [cache_lengths, input_lengths], name=f"{node.name}/total_lengths")
            seqlens_k = tape.op("Sub", [total, one], name=f"{node.name}/seqlens_k")
            total_len = tape.op("ReduceMax", [total], {"keepdims": 0}, name=f"{node.name}/total_sequence_length")
            shared[lengths_key] = (seqlens_k, total_len)
        seqlens_k, total_len = shared[lengths_key]
        cos, sin = (rotary + [None, None])[:2]
        window = int(attrs.get("sliding_window", 0))
        gqa_attrs = {
            "num_heads": int(attrs["num_heads"]),
            "kv_num_heads": int(attrs["kv_num_heads"]),
            "scale": float(attrs.get("scale", 0.0)),
            "local_window_size": window if window > 0 else -1,
            "do_rotary": int(cos is not None),
            "rotary_interleaved": int(attrs.get("rotary_interleaved", 0)),
        }
        outputs = tape.op_multi_out(
            "GroupQueryAttention",
            [query, key, value, past_key, past_value, seqlens_k, total_len, cos, sin],
            gqa_attrs, num_outputs=3, domain=MS_DOMAIN, name=f"{node.name}/GroupQueryAttention")
        replace_node(model, node, list(tape.nodes), list(outputs))
        lowered = True
    if lowered:
        model.graph.opset_imports[MS_DOMAIN] = MS_OPSET
    return model
