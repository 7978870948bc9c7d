"""Token embedding: a table lookup (``Gather``, optionally scaled), whose table the output projection may share."""
from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx_ir as ir

from ..ir import ops
from ..ir.graph import TOKEN_EMBEDDING_META
from ..weights.adapter import WeightRef
from .layer import Layer


class TokenLookup(Protocol):
    """What a decoder asks of its token embedding: the vocabulary's size and the lookup. An :class:`Embedding`, or
    one rank's shard of one (``graphs/nn/distributed``)."""

    name: str
    vocab_size: int

    def __call__(self, ids: ir.Value) -> ir.Value: ...


class Embedding(Layer):
    """``table[ids]`` for a ``[vocab, dim]`` table, times ``scale`` when one is given.

    ``scale`` is Gemma's ``sqrt(hidden_size)``: transformers multiplies the looked-up rows by it in the model's
    dtype (float32 here), after the lookup, so the table itself stays the checkpoint's and an output projection
    tied to it reads it unscaled.
    """

    def __init__(self, name: str, table: WeightRef, scale: float | None = None):
        super().__init__(name)
        self.table = table
        self.vocab_size, self.dim = table.shape
        self.scale = scale

    def __call__(self, ids: ir.Value) -> ir.Value:
        with self.scope():
            table = self.weight(self.table)
            table.meta[TOKEN_EMBEDDING_META] = True
            rows = ops.gather(table, ids, axis=0)
            if self.scale is None:
                return rows
            return ops.mul(rows, ops.constant(np.array(self.scale, np.float32)), name="scale")
