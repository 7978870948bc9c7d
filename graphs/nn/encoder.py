"""A bidirectional transformer encoder (BERT family) and its graph interface.

The encoder graph's interface (what the runtime binds):

- inputs: ``input_ids``, ``attention_mask`` (1 token, 0 padding) and ``token_type_ids``, all int64
  ``[batch, sequence]``; rows may be padded (right padding is what the runtime sends);
- output: ``last_hidden_state`` float32 ``[batch, sequence, hidden]`` without pooling, else ``embeddings``
  float32 ``[batch, hidden]``: the valid tokens pooled (:mod:`.pooling`), then L2-normalized when asked.

The graph's metadata records the pooling, the normalization and the longest sequence the position
table allows (``ember.max_sequence_length``).
"""
from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from ..ir.graph import Graph
from .encoder_attention import key_padding_bias
from .encoder_block import EncoderBlock
from .encoder_embeddings import EncoderEmbeddings
from .pooling import POOLING_MODES, l2_normalize, pool

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class Encoder:
    """Embeddings, a stack of post-norm blocks and optional pooling (``BertModel`` without its pooler)."""

    def __init__(self, embeddings: EncoderEmbeddings, layers: Sequence[EncoderBlock], *,
                 pooling: str | None = None, normalize: bool = False, max_sequence_length: int | None = None):
        if pooling is not None and pooling not in POOLING_MODES:
            raise ValueError(f"pooling {pooling!r} is not supported; supported: {', '.join(POOLING_MODES)} or None")
        if normalize and pooling is None:
            raise ValueError("normalize needs a pooling mode (it normalizes the pooled embedding)")
        self.embeddings = embeddings
        self.layers = list(layers)
        self.pooling, self.normalize = pooling, normalize
        self.max_sequence_length = max_sequence_length

    def build(self, name: str = "encoder") -> ir.Model:
        """Emit the whole encoder as an ``onnx_ir`` model."""
        with Graph(name) as graph:
            shape = ["batch", "sequence"]
            input_ids, attention_mask, token_type_ids = (graph.add_input(n, ir.DataType.INT64, shape)
                                                         for n in INPUT_NAMES)
            h = self.embeddings(input_ids, token_type_ids)
            bias = key_padding_bias(attention_mask)
            for block in self.layers:
                h = block(h, bias)
            if self.pooling is None:
                graph.add_output(h, "last_hidden_state")
            else:
                pooled = pool(h, attention_mask, self.pooling)
                graph.add_output(l2_normalize(pooled) if self.normalize else pooled, "embeddings")
            graph.metadata["ember.pooling"] = self.pooling or "none"
            graph.metadata["ember.normalize"] = str(bool(self.normalize)).lower()
            if self.max_sequence_length is not None:
                graph.metadata["ember.max_sequence_length"] = str(self.max_sequence_length)
            return graph.to_model()
