"""``onnxruntime-cpu``: the onnxruntime CPU execution provider, the first runtime backend (targets ``ort-cpu``,
``ort-cpu-qdq``).

Buffers are host arrays made with ``np.zeros`` (the OS maps their pages lazily: untouched capacity costs address
space, not memory), bound to onnxruntime by pointer through ``OrtValue``s that alias them; a model runs through an
``IOBinding`` kept across calls, so the KV cache and the logits are bound once and never copied per step.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import psutil

from .base import Buffer, LoadedModel, RuntimeBackend, same_size

if TYPE_CHECKING:
    from ember.compiler.artifact import Artifact

logger = logging.getLogger(__name__)

_ORT_ELEMENT_TYPES = {"float": "float32", "double": "float64"}  # onnxruntime's names that numpy spells otherwise


def ortvalue(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue that aliases ``array``'s memory (no copy): for buffers the graph updates in place."""
    if not array.flags.c_contiguous:
        raise ValueError("buffers bound to onnxruntime must be C-contiguous")
    return ort.OrtValue.ortvalue_from_numpy(array)


class OrtCpuModel(LoadedModel):
    """One rank's graph in an ``onnxruntime.InferenceSession`` with an IOBinding kept across calls."""

    backend: "OrtCpuBackend"

    def __init__(self, backend: "OrtCpuBackend", session: ort.InferenceSession, load_seconds: float,
                 renames: Mapping[str, str] | None = None):
        self.backend = backend
        self.session = session
        self.load_seconds = load_seconds
        self._renames = dict(renames or {})  # a fork's names -> the graph's (see fork)
        graph_names = {graph: name for name, graph in self._renames.items()}
        self.input_names = [graph_names.get(i.name, i.name) for i in session.get_inputs()]
        self.output_names = [graph_names.get(o.name, o.name) for o in session.get_outputs()]
        self.binding = session.io_binding()
        # name -> the view bound there, held: a bound view must outlive the binding, and an id() of a freed view
        # could come back for a new one and skip its binding
        self._bound_buffers: dict[str, ort.OrtValue] = {}
        self._output_order: list[str] = []  # onnxruntime returns outputs in first-bound order

    def fork(self, renames: Mapping[str, str]) -> "OrtCpuModel":
        """A second IOBinding of the same session (see :meth:`LoadedModel.fork`)."""
        return OrtCpuModel(self.backend, self.session, 0.0, renames)

    def input_dtype(self, name: str) -> np.dtype:
        name = self._renames.get(name, name)
        for value in self.session.get_inputs():
            if value.name == name:
                element = value.type.removeprefix("tensor(").removesuffix(")")
                return np.dtype(_ORT_ELEMENT_TYPES.get(element, element))
        raise KeyError(f"the graph has no input {name!r}")

    def bind_input(self, name: str, array: np.ndarray) -> None:
        # onnxruntime reads the host array in place
        self.binding.bind_cpu_input(self._renames.get(name, name), array)

    def bind_buffer(self, name: str, view: ort.OrtValue, *, output: bool = False) -> None:
        key = ("out:" if output else "in:") + name
        if self._bound_buffers.get(key) is view:
            return
        name = self._renames.get(name, name)
        if output:
            self._note_output(name)
            self.binding.bind_ortvalue_output(name, view)
        else:
            self.binding.bind_ortvalue_input(name, view)
        self._bound_buffers[key] = view

    def bind_output_to_host(self, name: str) -> None:
        self._bound_buffers.pop("out:" + name, None)
        name = self._renames.get(name, name)
        self._note_output(name)
        self.binding.bind_output(name, "cpu")

    def _note_output(self, name: str) -> None:
        if name not in self._output_order:
            self._output_order.append(name)

    def run(self) -> None:
        # Outputs bound to buffers are already in place: no per-step wrapping of every output (the KV cache is
        # ~60 of them).
        self.session.run_with_iobinding(self.binding)

    def output(self, name: str) -> np.ndarray:
        name = self._renames.get(name, name)
        return self.binding.get_outputs()[self._output_order.index(name)].numpy()

    def run_host(self, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        rename = self._renames.get
        return self.session.run([rename(n, n) for n in output_names], {rename(k, k): v for k, v in feeds.items()})


class OrtCpuBackend(RuntimeBackend):
    """See the module docstring. ``settings``: ``providers`` (the target's; CPU's by default) and
    ``disabled_optimizers`` (onnxruntime fusions the target measured as slower)."""

    name = "onnxruntime-cpu"
    device_kind = "cpu"
    providers = ("CPUExecutionProvider",)

    def __init__(self, settings: dict[str, Any] | None = None, num_threads: int = 1, device_index: int = 0):
        super().__init__(settings, num_threads, device_index)
        self._graph_sessions: dict[Path, ort.InferenceSession] = {}

    def allocate(self, shape: Sequence[int], dtype: Any) -> Buffer:
        array = np.zeros(tuple(shape), np.dtype(dtype))
        return Buffer(tuple(array.shape), array.dtype, array, array)

    def view(self, buffer: Buffer, start: int | None = None, stop: int | None = None, *,
             shape: Sequence[int] | None = None) -> ort.OrtValue:
        array = buffer.handle if start is None and stop is None else buffer.handle[start:stop]
        return ortvalue(array if shape is None else array.reshape(same_size(array.shape, shape)))

    def copy_rows(self, buffer: Buffer, dst: Sequence[int], src: Sequence[int], within: tuple = ()) -> None:
        array = buffer.handle
        array[(np.asarray(dst, np.intp), *within)] = array[(np.asarray(src, np.intp), *within)]

    def to_host(self, buffer: Buffer, start: int | None = None, stop: int | None = None) -> np.ndarray:
        return buffer.handle if start is None and stop is None else buffer.handle[start:stop]

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return options

    def _session(self, model_path: Path) -> ort.InferenceSession:
        providers = list(self.settings.get("providers", self.providers))
        return ort.InferenceSession(str(model_path), sess_options=self.session_options(), providers=providers,
                                    disabled_optimizers=list(self.settings.get("disabled_optimizers", [])))

    def load(self, artifact: "Artifact", rank: int = 0) -> OrtCpuModel:
        model = self.load_file(artifact.rank_model(rank))
        logger.info("loaded %s (rank %d) in %.2f s with %d threads", artifact.path, rank, model.load_seconds,
                    self.num_threads)
        return model

    def load_file(self, model_path: Path) -> OrtCpuModel:
        """One model file of a verified artifact (a tensor-parallel rank's stage: ``runtime/distributed/``)."""
        start = time.perf_counter()
        session = self._session(model_path)
        return OrtCpuModel(self, session, time.perf_counter() - start)

    def available_memory(self) -> int:
        return psutil.virtual_memory().available // 2

    def run_graph(self, model_path: Path, inputs: dict[str, np.ndarray],
                  in_place: dict[str, tuple[str, np.ndarray]]) -> None:
        # One session per model for this backend's life: a calibration runs the same model once per prompt length.
        if model_path not in self._graph_sessions:
            self._graph_sessions[model_path] = self._session(model_path)
        session = self._graph_sessions[model_path]
        binding = session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        bound = set()
        for name, (output, array) in in_place.items():
            value = ortvalue(array)
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(output, value)  # shared, as the runtime binds the KV cache
            bound.add(output)
        for output in session.get_outputs():
            if output.name not in bound:
                binding.bind_output(output.name, "cpu")
        session.run_with_iobinding(binding)


__all__ = ["OrtCpuBackend", "OrtCpuModel", "ortvalue"]
