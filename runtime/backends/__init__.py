"""Runtime backends, one module each, and the table that picks one for an artifact (see :mod:`.base`).

The manifest's ``"runtime"`` block names the backend that loads the artifact (written from the target by
``ember.compiler``); artifacts from before the block existed are onnxruntime-CPU's.
"""
from __future__ import annotations

from typing import Any

from .base import Buffer, LoadedModel, RuntimeBackend
from .ort_cpu import OrtCpuBackend
from .ort_cuda import OrtCudaBackend
from .tensorrt import TensorRTBackend

#: Backend name (the manifest's ``runtime.backend``) -> class. The GPU backends' modules import on a CPU-only
#: install (onnxruntime-gpu's CUDA provider, cuda-python and TensorRT are loaded when one is constructed).
BACKENDS: dict[str, type[RuntimeBackend]] = {b.name: b for b in (OrtCpuBackend, OrtCudaBackend, TensorRTBackend)}


def runtime_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's runtime block: backend name, device kind and load settings."""
    runtime = manifest.get("runtime")
    if runtime is None:  # written before the block existed: onnxruntime CPU, settings in "session"
        return {"backend": OrtCpuBackend.name, "device_kind": "cpu",
                "settings": {"providers": list(OrtCpuBackend.providers), **manifest.get("session", {})}}
    return runtime


def backend_for(manifest: dict[str, Any], num_threads: int,
                backends: dict[str, type[RuntimeBackend]] = BACKENDS, device_index: int = 0) -> RuntimeBackend:
    """A backend instance for an artifact's manifest; a ValueError naming the backend and the known ones."""
    return backend_from_runtime(runtime_of(manifest), num_threads, backends, device_index)


def backend_from_runtime(runtime: dict[str, Any], num_threads: int,
                         backends: dict[str, type[RuntimeBackend]] = BACKENDS, device_index: int = 0) -> RuntimeBackend:
    """A backend instance for a runtime block (a manifest's, or a target's before it has written one)."""
    name = runtime.get("backend")
    if name not in backends:
        raise ValueError(f"the artifact needs runtime backend {name!r}, which this ember does not have; "
                         f"available: {', '.join(sorted(backends))}")
    return backends[name](runtime.get("settings", {}), num_threads, device_index)


__all__ = ["BACKENDS", "Buffer", "LoadedModel", "OrtCpuBackend", "OrtCudaBackend", "RuntimeBackend", "TensorRTBackend",
           "backend_for", "backend_from_runtime", "runtime_of"]
