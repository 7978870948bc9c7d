"""The compile targets ember knows; one module per target."""
from __future__ import annotations

from .base import Target
from .ort_cpu import ORT_CPU
from .ort_cpu_qdq import ORT_CPU_QDQ
from .ort_cuda import ORT_CUDA
from .tensorrt import TENSORRT

TARGETS: dict[str, Target] = {t.name: t for t in (ORT_CPU, ORT_CPU_QDQ, ORT_CUDA, TENSORRT)}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; supported: {', '.join(TARGETS)}") from None


__all__ = ["TARGETS", "Target", "get_target"]
