"""Self-attention over the KV cache, with grouped-query heads: q/k/v projections (optionally a per-head norm of q
and k), ``ember.CachedAttention`` (contiguous cache) or ``ember.PagedAttention`` (page pool), o_proj."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ..ir import ops
from ..ir.custom import attention as attention_op
from ..ir.custom import paged_attention as paged_attention_op
from .linear import Projection
from .layer import Layer
from .norm import RMSNorm
from .rotary import RotaryEmbedding


@dataclass(frozen=True)
class PagedInputs:
    """The graph inputs that locate each row's tokens in a paged cache (shared by every layer)."""

    page_table: ir.Value  # int32 [batch, pages]
    slot_mapping: ir.Value  # int64 [batch, sequence]
    page_size: int


class Attention(Layer):
    """``num_heads`` query heads share ``num_kv_heads`` key/value heads (GQA; MQA at 1; MHA when equal).

    The variants of the family are parameters, not subclasses: ``scale`` (0: ``1 / sqrt(head_dim)``; Gemma 2:
    ``query_pre_attn_scalar ** -0.5``), ``softcap`` (0: none; Gemma 2: ``cap * tanh(scores / cap)``),
    ``sliding_window`` (0: none) and ``q_norm`` / ``k_norm`` (Qwen 3: an RMSNorm over each head's ``head_dim``
    features of q and k, before rotary, so that the attention op's rotary still applies after it).
    """

    def __init__(self, name: str, q_proj: Projection, k_proj: Projection, v_proj: Projection, o_proj: Projection, *,
                 num_heads: int, num_kv_heads: int, head_dim: int, rope: RotaryEmbedding | None,
                 sliding_window: int = 0, scale: float = 0.0, softcap: float = 0.0, q_norm: RMSNorm | None = None,
                 k_norm: RMSNorm | None = None):
        super().__init__(name)
        if num_heads % num_kv_heads:
            raise ValueError(f"{name}: {num_heads} heads do not divide into {num_kv_heads} kv heads")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope = rope
        self.sliding_window = sliding_window
        self.scale, self.softcap = scale, softcap
        self.q_norm, self.k_norm = q_norm, k_norm

    def _per_head_norm(self, norm: RMSNorm | None, x: ir.Value, heads: int) -> ir.Value:
        """``norm`` over each head's features: ``[b, s, heads * hd]`` seen as ``[b, s, heads, hd]`` and back."""
        if norm is None:
            return x
        batch, sequence, width = ops.dims(x)
        with self.scope():
            x = ops.reshape(x, [0, 0, heads, self.head_dim], [batch, sequence, heads, self.head_dim])
        x = norm(x)
        with self.scope():
            return ops.reshape(x, [0, 0, heads * self.head_dim], [batch, sequence, width])

    def __call__(self, x: ir.Value, past_key: ir.Value, past_value: ir.Value, cache_lengths: ir.Value,
                 input_lengths: ir.Value, paged: PagedInputs | None = None) -> tuple[ir.Value, ir.Value, ir.Value]:
        """Returns ``(output, present_key, present_value)``; with ``paged``, the caches are page pools."""
        q = self._per_head_norm(self.q_norm, self.q_proj(x), self.num_heads)
        k = self._per_head_norm(self.k_norm, self.k_proj(x), self.num_kv_heads)
        v = self.v_proj(x)
        cos, sin = self.rope() if self.rope is not None else (None, None)
        interleaved = bool(self.rope is not None and self.rope.interleaved)
        with self.scope():
            if paged is None:
                out, present_key, present_value = attention_op(
                    q, k, v, past_key, past_value, cache_lengths, input_lengths, cos, sin, num_heads=self.num_heads,
                    kv_num_heads=self.num_kv_heads, scale=self.scale, softcap=self.softcap,
                    sliding_window=self.sliding_window, rotary_interleaved=interleaved)
            else:
                out, present_key, present_value = paged_attention_op(
                    q, k, v, past_key, past_value, paged.page_table, paged.slot_mapping, cache_lengths,
                    input_lengths, cos, sin, page_size=paged.page_size, num_heads=self.num_heads,
                    kv_num_heads=self.num_kv_heads, scale=self.scale, softcap=self.softcap,
                    sliding_window=self.sliding_window, rotary_interleaved=interleaved)
        return self.o_proj(out), present_key, present_value
