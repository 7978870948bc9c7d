"""Bidirectional self-attention for encoders: every token attends to every valid (non-padding) token.

There is no KV cache and no causal mask, so the high-level graph uses the standard ONNX ``Attention``
op (opset 23), which ``onnx.reference.ReferenceEvaluator`` runs; targets may swap in a fused kernel.
Padding is masked out of the keys by an additive float bias, built once per graph from
``attention_mask`` by :func:`key_padding_bias` and shared by every layer. The bias is
``[batch, 1, sequence, sequence]``, not ``[batch, 1, 1, sequence]``: onnxruntime's ``Attention`` does not
broadcast the mask over the query axis. The ort-cpu pass ``pack_encoder_tokens`` recognizes this bias
(``Expand(Unsqueeze(Where(Equal(mask, 0), MASKED, 0)))``) to learn which tokens are valid: keep its form.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..ir import ops
from ..ir.graph import current_graph
from .layer import Layer
from .linear import Linear

MASKED = float(np.finfo(np.float32).min)  # what transformers adds for masked keys


def key_padding_bias(attention_mask: ir.Value, scope: str = "encoder.key_padding_bias") -> ir.Value:
    """``[batch, 1, sequence, sequence]`` float: 0 where the key is a token, ``MASKED`` where it is padding."""
    batch, sequence = ops.dims(attention_mask)
    with current_graph().scope(scope):
        is_padding = ops.equal(attention_mask, ops.constant(np.array(0, dtype=np.int64)))
        bias = ops.where(is_padding, ops.constant(np.array(MASKED, dtype=np.float32)),
                         ops.constant(np.array(0.0, dtype=np.float32)))
        bias = ops.unsqueeze(bias, [1, 2])  # [batch, 1, 1, sequence]
        batch_dim, seq_dim = ops.shape_of(attention_mask, 0, 1), ops.shape_of(attention_mask, 1, 2)
        target = ops.concat([batch_dim, ops.constant(np.array([1], dtype=np.int64)), seq_dim, seq_dim], axis=0)
        return ops.expand(bias, target, [batch, 1, sequence, sequence])


class EncoderSelfAttention(Layer):
    """q/k/v projections and multi-head attention (``BertSelfAttention``); the output projection is the block's."""

    def __init__(self, name: str, query: Linear, key: Linear, value: Linear, *, num_heads: int):
        super().__init__(name)
        if query.out_features % num_heads:
            raise ValueError(f"{name}: width {query.out_features} does not split into {num_heads} heads")
        self.query, self.key, self.value = query, key, value
        self.num_heads = num_heads
        self.head_dim = query.out_features // num_heads

    def __call__(self, x: ir.Value, bias: ir.Value) -> ir.Value:
        """``x`` ``[batch, sequence, hidden]``, ``bias`` from :func:`key_padding_bias` -> ``[batch, sequence, hidden]``."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        with self.scope():
            return ops.scaled_dot_product_attention(q, k, v, bias, num_heads=self.num_heads,
                                                    kv_num_heads=self.num_heads)
