"""InferenceSession: loads an artifact's compiled graph onto its devices and runs it with bound buffers.

On ``ort-cpu`` each rank is one ``onnxruntime.InferenceSession``. :class:`LoadedModel` runs it through an
``IOBinding`` so that large buffers (the KV cache, the logits) are bound once, by pointer, and never
copied per step; only the small per-step inputs (tokens, lengths) are rebound.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ember.compiler.artifact import Artifact, verify_artifact

logger = logging.getLogger(__name__)

_ORT_ELEMENT_TYPES = {"float": "float32", "double": "float64"}  # onnxruntime's names that numpy spells otherwise


@dataclass(frozen=True)
class Device:
    """A device a rank runs on (``max.driver.Device``'s role)."""

    kind: str = "cpu"
    id: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


def CPU(id: int = 0) -> Device:  # noqa: N802 - MAX spells device constructors this way
    return Device("cpu", id)


def default_num_threads() -> int:
    """Physical cores available to this process (onnxruntime's intra-op threads)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class LoadedModel:
    """One rank's compiled graph in onnxruntime, with an IOBinding kept across calls."""

    def __init__(self, session: ort.InferenceSession, artifact: Artifact, load_seconds: float):
        self.session = session
        self.artifact = artifact
        self.load_seconds = load_seconds
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.binding = session.io_binding()
        self._bound_buffers: dict[str, int] = {}
        self._output_order: list[str] = []  # onnxruntime returns outputs in first-bound order

    def input_dtype(self, name: str) -> np.dtype:
        """The numpy dtype the graph declares for input ``name`` (a buffer bound to it must have it)."""
        for value in self.session.get_inputs():
            if value.name == name:
                element = value.type.removeprefix("tensor(").removesuffix(")")
                return np.dtype(_ORT_ELEMENT_TYPES.get(element, element))
        raise KeyError(f"the graph has no input {name!r}")

    def bind_input(self, name: str, array: np.ndarray) -> None:
        """Bind a small host array as an input (onnxruntime reads it in place)."""
        self.binding.bind_cpu_input(name, array)

    def bind_buffer(self, name: str, value: ort.OrtValue, *, output: bool = False) -> None:
        """Bind a long-lived buffer (KV cache, logits); rebinding the same buffer again is free."""
        key = ("out:" if output else "in:") + name
        if self._bound_buffers.get(key) == id(value):
            return
        if output:
            self._note_output(name)
            self.binding.bind_ortvalue_output(name, value)
        else:
            self.binding.bind_ortvalue_input(name, value)
        self._bound_buffers[key] = id(value)

    def bind_output_to_host(self, name: str) -> None:
        """Let onnxruntime allocate an output whose shape changes per call."""
        self._note_output(name)
        self.binding.bind_output(name, "cpu")
        self._bound_buffers.pop("out:" + name, None)

    def _note_output(self, name: str) -> None:
        if name not in self._output_order:
            self._output_order.append(name)

    def run(self) -> None:
        """Run with the current bindings. Outputs bound to buffers are already in place; no per-step
        wrapping of every output (the KV cache is ~60 of them)."""
        self.session.run_with_iobinding(self.binding)

    def output(self, name: str) -> ort.OrtValue:
        """An output onnxruntime allocated in the last run (see :meth:`bind_output_to_host`)."""
        return self.binding.get_outputs()[self._output_order.index(name)]


class InferenceSession:
    """Loads compiled artifacts on ``devices`` (``max.engine.InferenceSession``'s role)."""

    def __init__(self, devices: list[Device] | None = None, num_threads: int | None = None):
        self.devices = list(devices or [CPU()])
        if any(d.kind != "cpu" for d in self.devices):
            raise ValueError(f"devices {', '.join(map(str, self.devices))}: this build runs on cpu only")
        self.num_threads = num_threads or default_num_threads()

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return options

    def load(self, artifact: Artifact | str | Path, rank: int = 0, verify: bool = True) -> LoadedModel:
        """Verify the artifact (unless given verified) and create the rank's onnxruntime session."""
        if not isinstance(artifact, Artifact):
            artifact = verify_artifact(artifact)
        elif verify:
            artifact = verify_artifact(artifact.path)
        start = time.perf_counter()
        # The target's load settings (e.g. onnxruntime fusions it measured as slower); older manifests have none.
        disabled = artifact.manifest.get("session", {}).get("disabled_optimizers", [])
        session = ort.InferenceSession(str(artifact.rank_model(rank)), sess_options=self.session_options(),
                                       providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
        seconds = time.perf_counter() - start
        logger.info("loaded %s (rank %d) in %.2f s with %d threads", artifact.path, rank, seconds, self.num_threads)
        return LoadedModel(session, artifact, seconds)


def ortvalue(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue that aliases ``array``'s memory (no copy): for buffers the graph updates in place."""
    if not array.flags.c_contiguous:
        raise ValueError("buffers bound to onnxruntime must be C-contiguous")
    return ort.OrtValue.ortvalue_from_numpy(array)


__all__: list[Any] = ["Device", "CPU", "InferenceSession", "LoadedModel", "ortvalue", "default_num_threads"]
