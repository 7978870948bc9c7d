"""Megatron's two halves of a sharded matrix product, with MAX's names.

- :class:`ColumnParallelLinear`: each rank computes some output features (rows of the ``[out, in]`` weight) from the
  whole input; no communication, unless ``gather_output`` asks every rank for all of them (the output head).
- :class:`RowParallelLinear`: each rank multiplies its slice of the input features (columns) and the partial
  products are summed over the ranks by ``ember.AllReduce``; the bias is added once, after the sum.

A column-parallel projection feeding a row-parallel one (q/k/v then o_proj, gate/up then down) keeps the
activations between them sharded: one all-reduce per pair.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from ...ir import ops
from ...ir.custom.collectives import all_gather, all_reduce
from ...weights.adapter import WeightRef
from ..layer import Layer
from .sharding import DeviceRef, column_slice, even_ranges, padded_ranges, row_slice


class ColumnShard(Layer):
    """One rank's rows of a column-parallel weight: ``x @ W_r^T (+ b_r)``, then (``gather_world`` > 1) the ranks'
    outputs concatenated on the last axis and cut to ``out_features`` (a padded last slice). ``transposed_table``:
    the weight is a ``[rows, in]`` table used as ``Gemm(x, T, transB=1)`` (an output head tied to the embedding,
    whose table slice is then stored once)."""

    def __init__(self, name: str, weight: WeightRef, bias: WeightRef | None, *, gather_world: int = 1,
                 out_features: int | None = None, transposed_table: bool = False):
        super().__init__(name)
        self.weight_ref, self.bias_ref = weight, bias
        self.gather_world = gather_world
        self.out_features = out_features if out_features is not None else weight.shape[0] * gather_world
        self.transposed_table = transposed_table

    def __call__(self, x: ir.Value) -> ir.Value:
        with self.scope():
            if self.transposed_table:
                y = ops.gemm(x, self.weight(self.weight_ref), trans_b=True)
            else:
                y = ops.matmul(x, self.weight(self.weight_ref.transposed()))
            if self.bias_ref is not None:
                y = ops.add(y, self.weight(self.bias_ref))
            if self.gather_world == 1:
                return y
            y = all_gather(y, world_size=self.gather_world, axis=-1)
            gathered = self.weight_ref.shape[0] * self.gather_world
            if gathered == self.out_features:
                return y
            shape = ops.dims(y)[:-1] + [self.out_features]
            return ops.slice_(y, ops.constant(np.array([0], np.int64)),
                              ops.constant(np.array([self.out_features], np.int64)), [len(shape) - 1], shape)


class RowShard(Layer):
    """One rank's columns of a row-parallel weight: ``AllReduce(x_r @ W_r^T) (+ b)``."""

    def __init__(self, name: str, weight: WeightRef, bias: WeightRef | None, world: int):
        super().__init__(name)
        self.weight_ref, self.bias_ref, self.world = weight, bias, world

    def __call__(self, x: ir.Value) -> ir.Value:
        with self.scope():
            y = all_reduce(ops.matmul(x, self.weight(self.weight_ref.transposed())), world_size=self.world)
            if self.bias_ref is not None:
                y = ops.add(y, self.weight(self.bias_ref))
            return y


class ColumnParallelLinear:
    """A ``[out, in]`` weight split by output features (see the module docstring).

    ``shard(devices)`` splits the rows evenly (sizes differing by at most one), or as ``ranges`` say (attention
    gives whole heads). With ``gather_output`` every rank gets all ``out`` features: the slices are made equal
    (the last padded with zero rows) so that one all-gather joins them, and the padding is cut off after it.
    ``tied``: the weight is an embedding table the output head shares (stored ``[vocab, dim]``, used transposed)."""

    def __init__(self, name: str, weight: WeightRef, bias: WeightRef | None = None, *, gather_output: bool = False,
                 tied: bool = False):
        self.name, self.weight, self.bias = name, weight, bias
        self.out_features, self.in_features = weight.shape
        self.gather_output, self.tied = gather_output, tied

    def shard(self, devices: Sequence[DeviceRef], ranges: Sequence[range] | None = None) -> list[ColumnShard]:
        world = len(devices)
        if self.gather_output:
            if ranges is not None:
                raise ValueError(f"{self.name}: a gathered output is split evenly, not by given ranges")
            ranges, part = padded_ranges(self.out_features, world)
            return [ColumnShard(self.name, row_slice(self.weight, rows, pad_to=part),
                                None if self.bias is None else row_slice(self.bias, rows, pad_to=part),
                                gather_world=world, out_features=self.out_features, transposed_table=self.tied)
                    for rows in ranges]
        ranges = even_ranges(self.out_features, world) if ranges is None else list(ranges)
        _check_ranges(self.name, ranges, world)
        return [ColumnShard(self.name, row_slice(self.weight, rows),
                            None if self.bias is None else row_slice(self.bias, rows), transposed_table=self.tied)
                for rows in ranges]


class RowParallelLinear:
    """A ``[out, in]`` weight split by input features, the partial products all-reduced (module docstring)."""

    def __init__(self, name: str, weight: WeightRef, bias: WeightRef | None = None):
        self.name, self.weight, self.bias = name, weight, bias
        self.out_features, self.in_features = weight.shape

    def shard(self, devices: Sequence[DeviceRef], ranges: Sequence[range] | None = None) -> list[RowShard]:
        world = len(devices)
        ranges = even_ranges(self.in_features, world) if ranges is None else list(ranges)
        _check_ranges(self.name, ranges, world)
        return [RowShard(self.name, column_slice(self.weight, columns), self.bias, world) for columns in ranges]


def _check_ranges(name: str, ranges: Sequence[range], world: int) -> None:
    if len(ranges) != world:
        raise ValueError(f"{name}: {len(ranges)} slices for {world} ranks")
    if any(len(r) == 0 for r in ranges):
        raise ValueError(f"{name}: a rank would get no features ({[len(r) for r in ranges]} over {world} ranks)")
