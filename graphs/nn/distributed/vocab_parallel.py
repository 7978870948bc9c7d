"""``VocabParallelEmbedding``: the token table split by vocabulary rows, one lookup per rank and an all-reduce.

Rank ``r`` holds rows ``[r * part, (r + 1) * part)`` of the ``[vocab, dim]`` table (``part = ceil(vocab / ranks)``,
the last slice padded with zero rows, the same slice an output head tied to the table gathers its logits from). An
id outside a rank's rows looks up row 0 and is zeroed; ``ember.AllReduce`` then sums the ranks' rows, of which
exactly one is the id's.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from ...ir import ops
from ...ir.custom.collectives import all_reduce
from ...ir.graph import TOKEN_EMBEDDING_META
from ...weights.adapter import WeightRef
from ..layer import Layer
from .sharding import DeviceRef, padded_ranges, row_slice


class VocabShard(Layer):
    """One rank's rows of the table (see the module docstring); ``vocab_size`` is the whole vocabulary's."""

    def __init__(self, name: str, table: WeightRef, start: int, vocab_size: int, world: int,
                 scale: float | None = None):
        super().__init__(name)
        self.table, self.start, self.world, self.scale = table, start, world, scale
        self.part, self.dim = table.shape
        self.vocab_size = vocab_size

    def __call__(self, ids: ir.Value) -> ir.Value:
        with self.scope():
            table = self.weight(self.table)
            table.meta[TOKEN_EMBEDDING_META] = True
            local = ops.sub(ids, ops.constant(np.array(self.start, np.int64)))
            inside = ops.and_(ops.not_(ops.less(local, ops.constant(np.array(0, np.int64)))),
                              ops.less(local, ops.constant(np.array(self.part, np.int64))))
            safe = ops.where(inside, local, ops.constant(np.array(0, np.int64)))
            rows = ops.gather(table, safe, axis=0)
            rows = ops.mul(rows, ops.unsqueeze(ops.cast(inside, ir.DataType.FLOAT), [-1]), name="mask")
            rows = all_reduce(rows, world_size=self.world)
            if self.scale is None:
                return rows
            return ops.mul(rows, ops.constant(np.array(self.scale, np.float32)), name="scale")


class VocabParallelEmbedding:
    """A ``[vocab, dim]`` token table split by vocabulary over devices (module docstring); ``scale`` as
    :class:`~ember.graphs.nn.embedding.Embedding`'s (Gemma's ``sqrt(hidden_size)``, applied after the sum)."""

    def __init__(self, name: str, table: WeightRef, scale: float | None = None):
        self.name, self.table, self.scale = name, table, scale
        self.vocab_size, self.dim = table.shape

    def table_slices(self, devices: Sequence[DeviceRef]) -> list[tuple[int, WeightRef]]:
        """Each rank's first id and padded table slice (an output head tied to the table uses the same slices)."""
        ranges, part = padded_ranges(self.vocab_size, len(devices))
        return [(rows.start if len(rows) else self.vocab_size, row_slice(self.table, rows, pad_to=part))
                for rows in ranges]

    def shard(self, devices: Sequence[DeviceRef]) -> list[VocabShard]:
        return [VocabShard(self.name, table, start, self.vocab_size, len(devices), self.scale)
                for start, table in self.table_slices(devices)]
