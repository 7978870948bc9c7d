"""``ember.AllReduce`` and ``ember.AllGather``: the collectives a tensor-parallel rank graph contains.

A tensor-parallel model is one graph per rank (``graphs/nn/distributed/``); where the ranks' partial results must
meet, the graph holds a collective over the ``world_size`` ranks of its group:

- ``AllReduce(x)``: every rank's output is the elementwise sum of every rank's ``x`` (the same shape on all ranks):
  after a row-parallel projection (each rank multiplied its slice of the input features) and after a
  vocabulary-parallel lookup (each rank found only the ids of its slice of the vocabulary).
- ``AllGather(x, axis)``: every rank's output is the ranks' ``x`` concatenated along ``axis`` in rank order (the
  same shape on all ranks): the vocabulary-parallel output head's logits.

A collective's meaning needs all the ranks' inputs, so the references here take them as a list (one array per rank,
in rank order) and return what every rank receives. A target with no in-graph collective (onnxruntime CPU) has
its rank graphs cut at the collectives into stages (``compiler/passes/cut_at_collectives.py``); the runtime's
communicator (``runtime/distributed/``) performs them between stages, and its tests check it against these
references.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx.defs import OpSchema

from ..graph import current_graph
from ..ops import dims, dtype
from ..versions import EMBER_DOMAIN, EMBER_OPSET

_TYPES = ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations")
_WORLD = OpSchema.Attribute("world_size", OpSchema.AttrType.INT, "ranks taking part (the group's size)",
                            required=True)

ALL_REDUCE_SCHEMA = OpSchema(
    "AllReduce", EMBER_DOMAIN, EMBER_OPSET,
    doc="Every rank receives the elementwise sum of every rank's input (see ember.graphs.ir.custom.collectives).",
    inputs=[OpSchema.FormalParameter("input", "T", "this rank's partial result")],
    outputs=[OpSchema.FormalParameter("output", "T", "the sum over the ranks, same shape")],
    type_constraints=[_TYPES],
    attributes=[_WORLD],
)

ALL_GATHER_SCHEMA = OpSchema(
    "AllGather", EMBER_DOMAIN, EMBER_OPSET,
    doc="Every rank receives the ranks' inputs concatenated along `axis` in rank order.",
    inputs=[OpSchema.FormalParameter("input", "T", "this rank's slice")],
    outputs=[OpSchema.FormalParameter("output", "T", "the slices of every rank, concatenated along axis")],
    type_constraints=[_TYPES],
    attributes=[_WORLD, OpSchema.Attribute("axis", OpSchema.AttrType.INT, "the axis to concatenate along",
                                           required=True)],
)

SCHEMAS = [ALL_REDUCE_SCHEMA, ALL_GATHER_SCHEMA]
#: The op types a rank graph's cut (and the runtime's stage runner) treat as collectives.
COLLECTIVE_OPS = frozenset(schema.name for schema in SCHEMAS)


def _check_world(world_size: int) -> None:
    if int(world_size) < 1:
        raise ValueError(f"a collective needs a world_size of at least 1 rank, not {world_size}")


def all_reduce(x: ir.Value, *, world_size: int, name: str = "AllReduce") -> ir.Value:
    """Emit ``ember.AllReduce`` (a sum over ``world_size`` ranks); the output has ``x``'s shape."""
    _check_world(world_size)
    return current_graph().add_node("AllReduce", [x], {"world_size": int(world_size)}, domain=EMBER_DOMAIN,
                                     outputs=[(dtype(x), dims(x))], name=name)[0]


def all_gather(x: ir.Value, *, world_size: int, axis: int, name: str = "AllGather") -> ir.Value:
    """Emit ``ember.AllGather`` along ``axis``; that axis of the output is ``world_size`` times ``x``'s."""
    _check_world(world_size)
    shape = dims(x)
    axis = axis % len(shape)
    size = shape[axis]
    shape[axis] = size * int(world_size) if isinstance(size, int) else f"{size}*{world_size}"
    return current_graph().add_node("AllGather", [x], {"world_size": int(world_size), "axis": axis},
                                    domain=EMBER_DOMAIN, outputs=[(dtype(x), shape)], name=name)[0]


def _check_shards(shards: Sequence[np.ndarray]) -> list[np.ndarray]:
    shards = [np.asarray(s) for s in shards]
    if not shards:
        raise ValueError("a collective needs the input of at least one rank")
    first = shards[0]
    for rank, shard in enumerate(shards[1:], start=1):
        if shard.shape != first.shape or shard.dtype != first.dtype:
            raise ValueError(f"rank {rank}'s input is {shard.dtype}{list(shard.shape)}, rank 0's "
                             f"{first.dtype}{list(first.shape)}: every rank must give the same shape and dtype")
    return shards


def all_reduce_reference(shards: Sequence[np.ndarray]) -> np.ndarray:
    """What every rank receives from ``ember.AllReduce``: the sum of ``shards`` (one per rank, in rank order),
    accumulated in rank order in the inputs' dtype."""
    shards = _check_shards(shards)
    total = shards[0].copy()
    for shard in shards[1:]:
        total += shard
    return total


def all_gather_reference(shards: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """What every rank receives from ``ember.AllGather``: ``shards`` concatenated along ``axis`` in rank order."""
    return np.concatenate(_check_shards(shards), axis=axis)
