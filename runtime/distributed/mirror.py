"""Rank 0 drives, the other ranks follow: every buffer and binding operation of rank 0 is replayed on them.

The decoder, its KV cache manager and the scheduler run on rank 0 only (as vLLM's driver worker does). They see one
:class:`~ember.runtime.backends.LoadedModel` and its backend; here that is :class:`MirroredModel` /
:class:`MirroredBackend`, which do each operation locally and record it: allocating a buffer (a KV cache layer's
pool, the logits), copying rows inside one (the continuous cache moving a slot), binding an input (tokens, lengths,
page table, slot mapping) or a buffer view. At :meth:`MirroredModel.run` the record goes to the other ranks in one
message (``StepMessage``) and every rank runs; their buffers are allocated with the same shapes (each rank holds its
share of the KV heads, the same number on every rank), so rank 0's page tables and slots mean the same on all.

Nothing of the pipeline changes for tensor parallelism: the paged and continuous caches, prefix caching, speculative
decoding and preemption all work through the same operations.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..backends.base import Buffer, LoadedModel, RuntimeBackend

if TYPE_CHECKING:
    from ember.compiler.artifact import Artifact

#: A buffer view as the other ranks rebuild it: (buffer key, start, stop, shape).
ViewKey = tuple[int, int | None, int | None, tuple[int, ...] | None]


@dataclass(frozen=True, eq=False)
class MirroredView:
    """A view of a buffer on rank 0 (``local``, what its engine binds) and how the other ranks make theirs."""

    local: Any
    key: ViewKey


@dataclass
class StepMessage:
    """What rank 0 did since the last run, in order, then ``run`` (False: the group is shutting down)."""

    operations: list[tuple] = field(default_factory=list)
    run: bool = True


class MirroredBackend(RuntimeBackend):
    """Rank 0's backend: the local one, with every buffer operation recorded for the other ranks."""

    def __init__(self, local: RuntimeBackend, ranks_on_host: int = 1):
        super().__init__(local.settings, local.num_threads, local.device_index)
        self.local = local
        self.name, self.device_kind = local.name, local.device_kind
        self.ranks_on_host = max(1, ranks_on_host)
        self.pending: list[tuple] = []
        self._keys: dict[int, tuple[int, Buffer]] = {}  # id(buffer) -> (key, buffer): kept alive, ids stay unique
        self._next_key = itertools.count()

    def key_of(self, buffer: Buffer) -> int:
        return self._keys[id(buffer)][0]

    def allocate(self, shape: Sequence[int], dtype: Any) -> Buffer:
        buffer = self.local.allocate(shape, dtype)
        key = next(self._next_key)
        self._keys[id(buffer)] = (key, buffer)
        self.pending.append(("allocate", key, tuple(int(d) for d in shape), np.dtype(dtype).str))
        return buffer

    def view(self, buffer: Buffer, start: int | None = None, stop: int | None = None, *,
             shape: Sequence[int] | None = None) -> MirroredView:
        local = self.local.view(buffer, start, stop, shape=shape)
        return MirroredView(local, (self.key_of(buffer), start, stop, None if shape is None else tuple(shape)))

    def copy_rows(self, buffer: Buffer, dst: Sequence[int], src: Sequence[int], within: tuple = ()) -> None:
        self.local.copy_rows(buffer, dst, src, within)
        self.pending.append(("copy_rows", self.key_of(buffer), list(map(int, dst)), list(map(int, src)), within))

    def to_host(self, buffer: Buffer, start: int | None = None, stop: int | None = None) -> np.ndarray:
        return self.local.to_host(buffer, start, stop)

    def available_memory(self) -> int:
        """This host's share for one rank: every rank on it allocates a cache as large as rank 0's."""
        return self.local.available_memory() // self.ranks_on_host

    def load(self, artifact: "Artifact", rank: int = 0) -> LoadedModel:
        raise TypeError("a mirrored backend is rank 0's view of a loaded tensor-parallel model; load through "
                        "ember.runtime.distributed.load_tensor_parallel")

    def run_graph(self, model_path: Path, inputs: dict[str, np.ndarray],
                  in_place: dict[str, tuple[str, np.ndarray]]) -> None:
        self.local.run_graph(model_path, inputs, in_place)


class StepSink(Protocol):
    """Where rank 0's steps go (``group.TensorParallelGroup``): sent before each run; told when a run failed."""

    def send(self, message: StepMessage) -> None: ...

    def run_failed(self, error: BaseException) -> None: ...


class MirroredModel(LoadedModel):
    """Rank 0's model: the local staged model, each binding recorded, each run sent to the other ranks first."""

    backend: MirroredBackend

    def __init__(self, local: LoadedModel, backend: MirroredBackend, group: StepSink):
        self.local = local
        self.backend = backend
        self.input_names, self.output_names = local.input_names, local.output_names
        self.load_seconds = local.load_seconds
        self.group = group
        self._sent: dict[tuple[str, bool], ViewKey] = {}  # the view each name has on the other ranks

    def input_dtype(self, name: str) -> np.dtype:
        return self.local.input_dtype(name)

    def bind_input(self, name: str, array: np.ndarray) -> None:
        self.local.bind_input(name, array)
        self.backend.pending.append(("input", name, array))

    def bind_buffer(self, name: str, view: MirroredView, *, output: bool = False) -> None:
        self.local.bind_buffer(name, view.local, output=output)
        if self._sent.get((name, output)) != view.key:
            self._sent[(name, output)] = view.key
            self.backend.pending.append(("buffer", name, view.key, output))

    def bind_output_to_host(self, name: str) -> None:
        self.local.bind_output_to_host(name)
        self._sent.pop((name, True), None)
        self.backend.pending.append(("output_to_host", name))

    def run(self) -> None:
        operations, self.backend.pending = self.backend.pending, []
        self.group.send(StepMessage(operations))
        try:
            self.local.run()
        except BaseException as error:
            self.group.run_failed(error)
            raise

    def output(self, name: str) -> np.ndarray:
        return self.local.output(name)


class Follower:
    """Another rank's side: replays rank 0's operations on its own backend and model (module docstring)."""

    def __init__(self, backend: RuntimeBackend, model: LoadedModel):
        self.backend, self.model = backend, model
        self.buffers: dict[int, Buffer] = {}
        self.views: dict[ViewKey, Any] = {}
        self.inputs: dict[str, np.ndarray] = {}  # the arrays bound last: the engine reads them where they lie

    def apply(self, message: StepMessage) -> None:
        for operation in message.operations:
            kind, *args = operation
            getattr(self, f"_{kind}")(*args)
        if message.run:
            self.model.run()

    def _allocate(self, key: int, shape: tuple[int, ...], dtype: str) -> None:
        self.buffers[key] = self.backend.allocate(shape, np.dtype(dtype))

    def _copy_rows(self, key: int, dst: list[int], src: list[int], within: tuple) -> None:
        self.backend.copy_rows(self.buffers[key], dst, src, within)

    def _input(self, name: str, array: np.ndarray) -> None:
        self.inputs[name] = array
        self.model.bind_input(name, array)

    def _buffer(self, name: str, key: ViewKey, output: bool) -> None:
        if key not in self.views:
            buffer, start, stop, shape = self.buffers[key[0]], key[1], key[2], key[3]
            self.views[key] = self.backend.view(buffer, start, stop, shape=shape)
        self.model.bind_buffer(name, self.views[key], output=output)

    def _output_to_host(self, name: str) -> None:
        self.model.bind_output_to_host(name)
