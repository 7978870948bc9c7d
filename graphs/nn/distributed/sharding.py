"""What splitting a model over ranks is made of: devices, the shardable protocol, MAX's helpers, weight slices.

ember builds one graph per rank (``compiler/`` writes ``rank<N>/``), so a sharded layer is a list with one plain
layer per rank, each owning only its slice of the checkpoint's weights and emitting the collectives its rank needs
(``graphs/ir/custom/collectives.py``). Slices are lazy, like every ember weight: a rank's graph loads its rows or
columns of a tensor when it is written, never the whole model.

Which slice a rank gets follows Megatron-LM: a column-parallel linear splits its output features (rows of the
``[out, in]`` checkpoint weight), a row-parallel linear its input features (columns), attention by whole heads.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from ...weights.adapter import QuantizedBlocks, WeightRef

T = TypeVar("T")


@dataclass(frozen=True)
class DeviceRef:
    """A device a rank runs on, as the graph sees it (``max.graph.DeviceRef``): its kind and index. The graph of a
    rank does not depend on either; only how many devices there are, and their order (the ranks)."""

    kind: str = "cpu"
    id: int = 0

    @staticmethod
    def CPU(id: int = 0) -> "DeviceRef":  # noqa: N802 - MAX's spelling
        return DeviceRef("cpu", id)

    @staticmethod
    def GPU(id: int = 0) -> "DeviceRef":  # noqa: N802
        return DeviceRef("cuda", id)

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


def cpu_devices(count: int) -> list[DeviceRef]:
    """``count`` ranks on the host (one process each: ``runtime/distributed/``)."""
    if count < 1:
        raise ValueError(f"tensor parallelism needs at least 1 rank, not {count}")
    return [DeviceRef.CPU(i) for i in range(count)]


@runtime_checkable
class ShardableCallable(Protocol):
    """A layer that can be split over devices: ``shard(devices)`` gives one callable per device, in order."""

    def shard(self, devices: Sequence[DeviceRef]) -> list[Callable[..., Any]]: ...


def distribute_value(value: T, devices: Sequence[DeviceRef]) -> list[T]:
    """One copy of ``value`` per device (MAX's helper). A rank's graph holds its own copy of every replicated value
    (norms, the residual stream), so the copies are the same object, one per rank."""
    return [value for _ in devices]


def forward_sharded_layers(layers: Sequence[Callable[..., T]], xs: Sequence[Any]) -> list[T]:
    """``layers[i](xs[i])`` for every rank ``i``; an AssertionError when the counts differ (a layer sharded over
    another number of devices than its inputs came from)."""
    assert len(layers) == len(xs), f"{len(layers)} sharded layers for {len(xs)} inputs: the counts must match"
    return [layer(x) for layer, x in zip(layers, xs)]


def take(it: Iterator[T] | Iterable[T], n: int) -> list[T]:
    """The next ``n`` items of an iterator, as a list (fewer if it runs out)."""
    return list(itertools.islice(iter(it), n))


def even_ranges(size: int, world: int) -> list[range]:
    """``range(size)`` cut into ``world`` contiguous parts whose sizes differ by at most one (the first ones larger):
    an MLP's intermediate features, which need not divide."""
    bounds = np.cumsum([0] + [size // world + (r < size % world) for r in range(world)])
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def padded_ranges(size: int, world: int) -> tuple[list[range], int]:
    """``range(size)`` cut into ``world`` parts of ``ceil(size / world)`` (the last ones shorter, maybe empty), and
    that part size: a vocabulary, whose logits are gathered from equal slices (padding rows give logits that are
    cut off after the gather)."""
    part = -(-size // world)
    return [range(min(r * part, size), min((r + 1) * part, size)) for r in range(world)], part


def row_slice(ref: WeightRef, rows: Sequence[int] | range, pad_to: int | None = None) -> WeightRef:
    """Rows ``rows`` (axis 0) of a weight, zero rows appended up to ``pad_to``: the output features of a
    column-parallel weight, a bias's slice, a vocabulary slice. Quantized blocks run along a row, so a slice of
    whole rows keeps them (padding does not: the padded weight is quantized again from floats)."""
    index = np.asarray(list(rows), dtype=np.int64)
    length = len(index) if pad_to is None else int(pad_to)
    if length < len(index):
        raise ValueError(f"{ref.name}: cannot pad {len(index)} rows to {length}")
    load = ref.load

    def load_rows() -> np.ndarray:
        array = load()
        part = array[index]
        if length > len(index):
            part = np.concatenate([part, np.zeros((length - len(index), *array.shape[1:]), array.dtype)])
        return np.ascontiguousarray(part)

    blocks = None
    if ref.blocks is not None and length == len(index):
        source_blocks = ref.blocks
        blocks = QuantizedBlocks(source_blocks.qtype, (len(index), source_blocks.shape[1]),
                                 lambda: np.ascontiguousarray(source_blocks.load()[index]))
    return WeightRef(ref.name, (length, *ref.shape[1:]), load_rows, blocks)


def column_slice(ref: WeightRef, columns: Sequence[int] | range) -> WeightRef:
    """Columns ``columns`` (axis 1) of a ``[out, in]`` weight: the input features of a row-parallel weight. The
    checkpoint's blocks are not kept (a block may straddle the cut); the slice is quantized again from floats."""
    if len(ref.shape) != 2:
        raise ValueError(f"{ref.name}: a column slice needs a 2-D weight, not shape {list(ref.shape)}")
    index = np.asarray(list(columns), dtype=np.int64)
    load = ref.load
    return WeightRef(ref.name, (ref.shape[0], len(index)), lambda: np.ascontiguousarray(load()[:, index]))
