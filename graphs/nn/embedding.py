"""Token embedding: a table lookup (``Gather``), whose table the output projection may share."""
from __future__ import annotations

import onnx_ir as ir

from ..ir import ops
from ..ir.graph import TOKEN_EMBEDDING_META
from ..weights.adapter import WeightRef
from .layer import Layer


class Embedding(Layer):
    """``table[ids]`` for a ``[vocab, dim]`` table."""

    def __init__(self, name: str, table: WeightRef):
        super().__init__(name)
        self.table = table
        self.vocab_size, self.dim = table.shape

    def __call__(self, ids: ir.Value) -> ir.Value:
        with self.scope():
            table = self.weight(self.table)
            table.meta[TOKEN_EMBEDDING_META] = True
            return ops.gather(table, ids, axis=0)
