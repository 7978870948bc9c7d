"""What a runtime backend does (DESIGN.md: runtime backends): device buffers, row copies, loading a rank, runs.

A target (``compiler/targets/``) names the backend that loads what it writes (the manifest's ``"runtime"``
block). The backend owns memory: KV cache managers, the decoder's logits and compile-time calibration ask it for
buffers and never allocate themselves, so a device backend (onnxruntime CUDA, TensorRT) keeps the cache on its
device and binds it by address, as the CPU backend binds host memory. A new target is one compiler file plus one
backend file that implements :class:`RuntimeBackend` and :class:`LoadedModel`.
"""
from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ember.compiler.artifact import Artifact


def same_size(shape: Sequence[int], new_shape: Sequence[int]) -> tuple[int, ...]:
    """``new_shape`` as a tuple, when it holds exactly the elements of ``shape`` (a view may only reshape)."""
    new_shape = tuple(int(d) for d in new_shape)
    if int(np.prod(shape, dtype=np.int64)) != int(np.prod(new_shape, dtype=np.int64)):
        raise ValueError(f"a view of shape {tuple(shape)} cannot be bound as {new_shape}: the sizes differ")
    return new_shape


@dataclass(frozen=True, eq=False)
class Buffer:
    """A device buffer a backend allocated: its shape and dtype, the backend's handle, and the host array that
    holds it when the device is the host (None on a GPU: read it with :meth:`RuntimeBackend.to_host`)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    handle: Any
    host: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class LoadedModel(abc.ABC):
    """One rank's compiled graph, loaded by a backend, with a binding kept across calls: large buffers (KV cache,
    logits) are bound once by address; only the small per-step inputs are rebound."""

    backend: "RuntimeBackend"
    input_names: list[str]
    output_names: list[str]
    load_seconds: float

    @property
    def shape_limits(self) -> dict[str, int]:
        """Symbolic dimension (``batch``, ``max_length``, ``pages``, ``pool_rows``, ...) -> the largest size this
        loaded model accepts; empty when any size runs (onnxruntime). A TensorRT engine's optimization profile
        fixes them when it is built, and the pipeline sizes its KV cache and batches to fit."""
        return {}

    @abc.abstractmethod
    def input_dtype(self, name: str) -> np.dtype:
        """The dtype the graph declares for input ``name`` (a buffer bound to it must have it)."""

    @abc.abstractmethod
    def bind_input(self, name: str, array: np.ndarray) -> None:
        """Bind a small host array as an input for the next runs."""

    @abc.abstractmethod
    def bind_buffer(self, name: str, view: Any, *, output: bool = False) -> None:
        """Bind a long-lived buffer view (:meth:`RuntimeBackend.view`) as an input or output; rebinding the same
        view is free."""

    @abc.abstractmethod
    def bind_output_to_host(self, name: str) -> None:
        """Let the engine allocate an output whose shape changes per call (read it with :meth:`output`)."""

    @abc.abstractmethod
    def run(self) -> None:
        """Run with the current bindings; outputs bound to buffers are written in place."""

    @abc.abstractmethod
    def output(self, name: str) -> np.ndarray:
        """An output the engine allocated in the last run (:meth:`bind_output_to_host`), on the host."""

    def bind_output_on_device(self, name: str) -> None:
        """Like :meth:`bind_output_to_host`, on the model's device: for a value the next graph reads where it is
        (a tensor-parallel stage's output, summed by NCCL in place). The host backends' device is the host."""
        self.bind_output_to_host(name)

    def device_output(self, name: str) -> Any:
        """An output the engine allocated on the device in the last run (:meth:`bind_output_on_device`), as what
        :meth:`bind_buffer` binds (a device view); a host array on the host backends (bind it with
        :meth:`bind_input`)."""
        return self.output(name)

    def fork(self, renames: Mapping[str, str]) -> "LoadedModel":
        """Another binding of the same loaded graph (its weights loaded once), which binds name ``n`` as
        ``renames.get(n, n)``: one binding per branch of a graph switched by an input (``compiler/graph_switch.py``;
        compiled for onnxruntime's CPU provider only, whose model overrides this)."""
        raise ValueError(f"{self.backend.name} keeps one binding per loaded model; a switched graph (decode slots) "
                         "is compiled for onnxruntime's CPU provider")

    def run_host(self, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One call with host inputs and host outputs (no buffers kept): models without a KV cache (encoders). This
        form goes through the bindings; an engine with a direct host call (onnxruntime's ``run``) overrides it."""
        for name, array in feeds.items():
            self.bind_input(name, array)
        for name in output_names:
            self.bind_output_to_host(name)
        self.run()
        return [self.output(name).copy() for name in output_names]


class RuntimeBackend(abc.ABC):
    """An engine on a device kind (see the module docstring). ``settings`` are the manifest's load settings."""

    name: str
    device_kind: str

    def __init__(self, settings: dict[str, Any] | None = None, num_threads: int = 1, device_index: int = 0):
        self.settings = dict(settings or {})
        self.num_threads = num_threads
        self.device_index = device_index  # which device of its kind (``cuda:N``); 0 on the host

    @abc.abstractmethod
    def allocate(self, shape: Sequence[int], dtype: Any) -> Buffer:
        """A zero-filled buffer on the device."""

    @abc.abstractmethod
    def view(self, buffer: Buffer, start: int | None = None, stop: int | None = None, *,
             shape: Sequence[int] | None = None) -> Any:
        """What binds rows ``start:stop`` of ``buffer`` (all rows by default) without copying; ``shape`` binds the
        same bytes with another shape of the same size (C order), e.g. a page-major ``[pages, page_size, ...]``
        view of a ``[pages * page_size, ...]`` pool for a kernel that wants it."""

    @abc.abstractmethod
    def copy_rows(self, buffer: Buffer, dst: Sequence[int], src: Sequence[int], within: tuple = ()) -> None:
        """``buffer[dst][within] = buffer[src][within]`` along the first axis (``within`` indexes the others),
        as one copy: a swap (``dst=[a, b], src=[b, a]``) reads before it writes."""

    @abc.abstractmethod
    def to_host(self, buffer: Buffer, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of the buffer on the host (all by default; a view of the array itself when the
        device is the host: copy it to keep it past the next run)."""

    @abc.abstractmethod
    def load(self, artifact: "Artifact", rank: int = 0) -> LoadedModel:
        """Load one rank of a verified artifact."""

    @abc.abstractmethod
    def available_memory(self) -> int:
        """Bytes of device memory the KV cache may take by default (half of what is free)."""

    @abc.abstractmethod
    def run_graph(self, model_path: Path, inputs: dict[str, np.ndarray],
                  in_place: dict[str, tuple[str, np.ndarray]]) -> None:
        """Compile-time runs (``ember.compiler``'s ``GraphRunner``): run a saved model on host ``inputs``;
        ``in_place`` maps an input to ``(output, host array)`` bound to both, updated in place; other outputs
        are discarded."""
