"""Transformer blocks and the decoder that stacks them, reading and writing the KV cache.

The decoder graph's interface (what the runtime binds):

- inputs: ``input_ids`` int64 ``[batch, sequence]`` (rows right-padded), ``input_lengths`` int32
  ``[batch]`` (valid tokens per row), ``cache_lengths`` int32 ``[batch]`` (tokens already cached per row),
  and per layer ``past_key_values.{i}.key`` / ``.value`` ``[batch, kv_heads, max_length, head_dim]``;
- outputs: ``logits`` (``[batch, vocab]`` for each row's last valid token, or ``[batch, sequence, vocab]``
  with :attr:`ReturnLogits.ALL`) and per layer ``present.{i}.key`` / ``.value``, which the runtime binds to
  the same buffers as the past (the cache is updated in place).

With the ``PAGED`` strategy the caches are page pools shared by all rows (``ember.PagedAttention``):

- inputs: ``input_ids``, ``input_lengths``, ``cache_lengths`` as above, ``page_table`` int32 ``[batch, pages]``
  (each row's page ids in order, padded with page 0), ``slot_mapping`` int64 ``[batch, sequence]`` (the pool
  row ``page * page_size + offset`` of each new token; padding tokens point into page 0, a scratch page the
  runtime never hands out), and per layer ``key_cache.{i}`` / ``value_cache.{i}`` ``[pool_rows, kv_heads,
  head_dim]`` (``pool_rows = num_pages * page_size``);
- outputs: ``logits`` and per layer ``key_cache_out.{i}`` / ``value_cache_out.{i}``, bound by the runtime to
  the input pools' own buffers. The page size is in the graph metadata (``ember.kv_page_size``).
"""
from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from ..ir import ops
from ..ir.graph import Graph, current_graph
from ..ir.subgraphs import outline_layer_groups
from .attention import Attention, PagedInputs
from .embedding import TokenLookup
from .kv_cache import KVCacheParams, KVCacheStrategy
from .layer import Layer
from .linear import Projection
from .mlp import MLP
from .norm import RMSNorm
from .rotary import RotaryEmbedding


class ReturnLogits(str, enum.Enum):
    """Which positions the graph returns logits for."""

    LAST_TOKEN = "last_token"
    ALL = "all"


class TransformerBlock(Layer):
    """Pre-norm block: ``h += attn(norm(h)); h += mlp(norm(h))``.

    ``attention_output_norm`` / ``mlp_output_norm`` (Gemma 2's ``post_attention_layernorm`` and
    ``post_feedforward_layernorm``) normalize each sub-layer's output before its residual add, the "sandwich"
    form: ``h += norm(attn(norm(h)))``. They are parameters of this block rather than another block class, so
    every decoder shares one residual path (and one fusion pattern: ``Add`` then the next ``RMSNormalization``).
    """

    def __init__(self, name: str, attention: Attention, mlp: MLP, attention_norm: RMSNorm, mlp_norm: RMSNorm,
                 attention_output_norm: RMSNorm | None = None, mlp_output_norm: RMSNorm | None = None):
        super().__init__(name)
        self.self_attn, self.mlp = attention, mlp
        # named by role, not by checkpoint: Llama's ``post_attention_layernorm`` is the mlp_norm, Gemma 2's is
        # the attention_output_norm (each RMSNorm carries its checkpoint name itself)
        self.attention_norm, self.mlp_norm = attention_norm, mlp_norm
        self.attention_output_norm, self.mlp_output_norm = attention_output_norm, mlp_output_norm

    def __call__(self, h: ir.Value, past_key: ir.Value, past_value: ir.Value, cache_lengths: ir.Value,
                 input_lengths: ir.Value, paged: PagedInputs | None = None) -> tuple[ir.Value, ir.Value, ir.Value]:
        attn, present_key, present_value = self.self_attn(self.attention_norm(h), past_key, past_value,
                                                          cache_lengths, input_lengths, paged)
        if self.attention_output_norm is not None:
            attn = self.attention_output_norm(attn)
        with self.scope():
            h = ops.add(h, attn, name="attn_residual")
        mlp = self.mlp(self.mlp_norm(h))
        if self.mlp_output_norm is not None:
            mlp = self.mlp_output_norm(mlp)
        with self.scope():
            h = ops.add(h, mlp, name="mlp_residual")
        return h, present_key, present_value


class Transformer:
    """A decoder-only transformer over a KV cache (``max.nn.Transformer``'s shape)."""

    def __init__(self, dim: int, n_heads: int, layers: Sequence[TransformerBlock], norm: RMSNorm,
                 output: Projection, embedding: TokenLookup, kv_params: KVCacheParams,
                 rope: RotaryEmbedding | None, return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN,
                 logit_softcap: float = 0.0, use_subgraphs: bool = False,
                 subgraph_layer_groups: Sequence[Sequence[int]] | None = None):
        """``logit_softcap`` > 0 bounds the logits to ``cap * tanh(logits / cap)`` (Gemma 2's
        ``final_logit_softcapping``); it is part of the model, so the runtime's sampling sees capped logits.
        ``use_subgraphs``: each group of identical blocks (``subgraph_layer_groups``, or every set of structurally
        identical blocks) is emitted once, as an ONNX model-local function called per layer
        (:mod:`ember.graphs.ir.subgraphs`)."""
        if logit_softcap < 0:
            raise ValueError(f"logit_softcap must not be negative (0: none), not {logit_softcap}")
        self.dim, self.n_heads = dim, n_heads
        self.layers = list(layers)
        self.norm, self.output, self.embedding = norm, output, embedding
        self.kv_params, self.rope = kv_params, rope
        self.return_logits = ReturnLogits(return_logits)
        self.logit_softcap = logit_softcap
        self.use_subgraphs = use_subgraphs
        self.subgraph_layer_groups = subgraph_layer_groups

    @property
    def paged(self) -> bool:
        return self.kv_params.cache_strategy is KVCacheStrategy.PAGED

    def _kv_shape(self) -> list:
        if self.paged:
            return ["pool_rows", self.kv_params.n_kv_heads, self.kv_params.head_dim]
        return ["batch", self.kv_params.n_kv_heads, "max_length", self.kv_params.head_dim]

    def build(self, name: str = "model") -> ir.Model:
        """Emit the whole decoder as an ``onnx_ir`` model."""
        with Graph(name) as graph:
            input_ids = graph.add_input("input_ids", ir.DataType.INT64, ["batch", "sequence"])
            input_lengths = graph.add_input("input_lengths", ir.DataType.INT32, ["batch"])
            cache_lengths = graph.add_input("cache_lengths", ir.DataType.INT32, ["batch"])
            paged = None
            if self.paged:
                paged = PagedInputs(graph.add_input("page_table", ir.DataType.INT32, ["batch", "pages"]),
                                    graph.add_input("slot_mapping", ir.DataType.INT64, ["batch", "sequence"]),
                                    self.kv_params.page_size)
                graph.metadata["ember.kv_cache_strategy"] = KVCacheStrategy.PAGED.value
                graph.metadata["ember.kv_page_size"] = str(self.kv_params.page_size)
            pasts = []
            for i in range(len(self.layers)):
                key_name, value_name = self.kv_params.input_names(i)
                pasts.append((graph.add_input(key_name, ir.DataType.FLOAT, self._kv_shape()),
                              graph.add_input(value_name, ir.DataType.FLOAT, self._kv_shape())))

            h = self.embedding(input_ids)
            presents = []
            for block, (past_key, past_value) in zip(self.layers, pasts):
                h, present_key, present_value = block(h, past_key, past_value, cache_lengths, input_lengths, paged)
                presents.append((present_key, present_value))

            logits = self._logits(h, input_lengths)
            graph.add_output(logits, "logits")
            for i, (present_key, present_value) in enumerate(presents):
                key_name, value_name = self.kv_params.output_names(i)
                graph.add_output(present_key, key_name)
                graph.add_output(present_value, value_name)
            graph.metadata["ember.return_logits"] = self.return_logits.value
            model = graph.to_model()
        if self.use_subgraphs:
            model = outline_layer_groups(model, self.subgraph_layer_groups)
        return model

    def _capped(self, logits: ir.Value) -> ir.Value:
        if not self.logit_softcap:
            return logits
        with current_graph().scope("model.logit_softcap"):
            cap = ops.constant(np.array(self.logit_softcap, np.float32))
            return ops.mul(ops.tanh(ops.div(logits, cap)), cap)

    def _logits(self, h: ir.Value, input_lengths: ir.Value) -> ir.Value:
        if self.return_logits is ReturnLogits.LAST_TOKEN:
            # Only each row's last valid token reaches the norm and the (large) output projection.
            with current_graph().scope("model.last_token"):
                last = ops.sub(ops.cast(input_lengths, ir.DataType.INT64), ops.constant(np.array(1, np.int64)))
                h = ops.gather_nd(h, ops.unsqueeze(last, [1]), batch_dims=1)  # [batch, dim]
            return self._capped(self.output(self.norm(h)))
        h = self.norm(h)
        with current_graph().scope("model.all_logits"):
            batch_and_sequence = ops.shape_of(h, 0, 2)
            flat = ops.reshape(h, [-1, self.dim], ["rows", self.dim])
        logits = self._capped(self.output(flat))
        with current_graph().scope("model.all_logits"):
            vocab = self.embedding.vocab_size
            target = ops.concat([batch_and_sequence, ops.constant(np.array([vocab], np.int64))], axis=0)
            return ops.reshape_dynamic(logits, target, ["batch", "sequence", vocab])
