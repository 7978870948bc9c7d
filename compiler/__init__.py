"""ember's compiler: lowers a high-level graph for a target and writes the artifact directory.

Names are imported lazily so that loading an artifact (``ember.compiler.artifact``) does not pay for
importing the graph IR and the passes.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Artifact": "artifact", "ArtifactError": "artifact", "verify_artifact": "artifact",
    "CompileOptions": "compile", "cache_key": "compile", "compile_graph": "compile", "toolchain_versions": "compile",
    "TARGETS": "targets", "get_target": "targets",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__} has no attribute {name}")


__all__ = list(_EXPORTS)
