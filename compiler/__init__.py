"""ember's compiler: lowers a high-level graph for a target and writes the artifact directory."""
from .artifact import Artifact, ArtifactError, verify_artifact
from .compile import CompileOptions, cache_key, compile_graph, toolchain_versions
from .targets import TARGETS, get_target

__all__ = ["Artifact", "ArtifactError", "verify_artifact", "CompileOptions", "cache_key", "compile_graph",
           "toolchain_versions", "TARGETS", "get_target"]
