"""The input embeddings of a BERT-family encoder: ``LayerNorm(word[ids] + position[pos] + token_type[types])``.

Two ways to number positions, both computed inside the graph so that the runtime binds only the token
ids, the attention mask and the token types:

- ``"absolute"`` (BERT): ``0 .. S-1`` for every row, i.e. the first ``S`` rows of the position table
  (a ``Slice``, no gather);
- ``"padding_offset"`` (RoBERTa, XLM-R): transformers' ``create_position_ids_from_input_ids``, i.e.
  ``padding_idx + cumsum(m) * m`` with ``m = input_ids != padding_idx``. Positions depend on the token
  ids, not on the attention mask, exactly as transformers does; padding tokens get ``padding_idx``.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..ir import ops
from ..ir.graph import current_graph
from ..weights.adapter import WeightRef
from .embedding import Embedding
from .layer import Layer
from .norm import LayerNorm

POSITION_KINDS = ("absolute", "padding_offset")


class EncoderEmbeddings(Layer):
    """Word + position + token-type embeddings, then LayerNorm (``BertEmbeddings``/``RobertaEmbeddings``)."""

    def __init__(self, name: str, word: Embedding, position_table: WeightRef, token_type: Embedding | None,
                 norm: LayerNorm, positions: str = "absolute", padding_idx: int | None = None):
        super().__init__(name)
        if positions not in POSITION_KINDS:
            raise ValueError(f"position kind {positions!r} is not supported; supported: {', '.join(POSITION_KINDS)}")
        if positions == "padding_offset" and padding_idx is None:
            raise ValueError("padding_offset positions need a padding_idx")
        self.word, self.token_type, self.norm = word, token_type, norm
        self.position_table = position_table
        self.positions, self.padding_idx = positions, padding_idx
        self.max_positions, self.dim = position_table.shape

    def position_embeddings(self, input_ids: ir.Value) -> ir.Value:
        """``[sequence, dim]`` (absolute, shared by all rows) or ``[batch, sequence, dim]`` (padding offset)."""
        table = self.weight(self.position_table)
        with current_graph().scope(f"{self.name}.position_embeddings"):
            if self.positions == "absolute":
                length = ops.shape_of(input_ids, 1, 2)
                start = ops.constant(np.array([0], dtype=np.int64))
                return ops.slice_(table, start, length, [0], [ops.dims(input_ids)[1], self.dim])
            pad = ops.constant(np.array(self.padding_idx, dtype=np.int64))
            mask = ops.cast(ops.not_(ops.equal(input_ids, pad)), ir.DataType.INT64)
            position_ids = ops.add(ops.mul(ops.cumsum(mask, axis=1), mask), pad)
            return ops.gather(table, position_ids, axis=0)

    def __call__(self, input_ids: ir.Value, token_type_ids: ir.Value | None) -> ir.Value:
        h = self.word(input_ids)
        if self.token_type is not None and token_type_ids is not None:
            types = self.token_type(token_type_ids)
            with self.scope():
                h = ops.add(h, types, name="add_token_types")
        positions = self.position_embeddings(input_ids)
        with self.scope():
            h = ops.add(h, positions, name="add_positions")
        return self.norm(h)
