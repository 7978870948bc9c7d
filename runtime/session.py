"""InferenceSession: loads an artifact's compiled graph onto its devices through the artifact's runtime backend.

The manifest names the backend (``runtime/backends/``); the session checks that its devices are of the kind the
artifact was compiled for, and hands back the backend's :class:`~ember.runtime.backends.LoadedModel`, which owns
the binding of inputs, long-lived buffers and outputs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends import BACKENDS, LoadedModel, RuntimeBackend, backend_for, runtime_of

if TYPE_CHECKING:
    from ember.compiler.artifact import Artifact

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    """A device a rank runs on (``max.driver.Device``'s role)."""

    kind: str = "cpu"
    id: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


def CPU(id: int = 0) -> Device:  # noqa: N802 - MAX spells device constructors this way
    return Device("cpu", id)


def parse_device(text: str) -> Device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``--device``, ``PipelineConfig.device``) as a :class:`Device`; a
    ValueError in one line for anything else."""
    kind, _, index = str(text).strip().partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise ValueError(f"device {text!r} is not cpu, cuda or cuda:N")
    return Device(kind, int(index or 0))


def default_num_threads() -> int:
    """CPUs available to this process (onnxruntime's intra-op threads)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class InferenceSession:
    """Loads compiled artifacts on ``devices`` (``max.engine.InferenceSession``'s role).

    ``num_threads`` above the CPUs this process may use is capped to them, with a warning: more threads than
    cores only contend (1000 threads took minutes to start)."""

    def __init__(self, devices: list[Device] | None = None, num_threads: int | None = None,
                 backends: dict[str, type[RuntimeBackend]] = BACKENDS):
        self.devices = list(devices or [CPU()])
        kinds = {d.kind for d in self.devices}
        known = {backend.device_kind for backend in backends.values()}
        if not kinds <= known:
            raise ValueError(f"devices {', '.join(map(str, self.devices))}: this build runs on "
                             f"{', '.join(sorted(known))} only")
        available = default_num_threads()
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be positive, got {num_threads}")
        if num_threads is not None and num_threads > available:
            logger.warning("--threads %d capped to %d, the CPUs this process may use", num_threads, available)
            num_threads = available
        self.num_threads = num_threads or available
        self.backends = backends

    def load(self, artifact: "Artifact | str | Path", rank: int = 0, verify: bool = True) -> LoadedModel:
        """Verify the artifact (unless given verified) and load its rank through the backend it names."""
        from ember.compiler.artifact import Artifact, verify_artifact  # the artifact format only

        if not isinstance(artifact, Artifact):
            artifact = verify_artifact(artifact)
        elif verify:
            artifact = verify_artifact(artifact.path)
        kind = runtime_of(artifact.manifest).get("device_kind", "cpu")
        if kind not in {d.kind for d in self.devices}:
            raise ValueError(f"artifact {artifact.path} was compiled for {kind} devices; this session has "
                             f"{', '.join(map(str, self.devices))}")
        if artifact.world_size > 1:  # rank 0 of a tensor-parallel group: the other ranks start and follow it
            from .distributed.group import load_tensor_parallel

            return load_tensor_parallel(artifact, self.backend(artifact.manifest), self.num_threads)
        return self.backend(artifact.manifest).load(artifact, rank)

    def backend(self, manifest: dict[str, Any]) -> RuntimeBackend:
        """The backend an artifact's manifest names, with this session's threads, on this session's first device of
        the artifact's device kind."""
        kind = runtime_of(manifest).get("device_kind", "cpu")
        index = next((d.id for d in self.devices if d.kind == kind), 0)
        return backend_for(manifest, self.num_threads, self.backends, index)


__all__ = ["Device", "CPU", "InferenceSession", "LoadedModel", "default_num_threads", "parse_device"]
