"""Compiling a model: into the compile cache, or into a directory the user names.

A quantized text-generation artifact is then checked against the float32 build of the same weights (the short
form of ``ember verify``, :func:`ember.tools.verify.record_verification`) and the figures go into its manifest,
so whoever deploys it sees what the encoding costs on the machine that compiled it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ember.compiler import artifact_lock
from ember.compiler.artifact import MANIFEST, Artifact, ArtifactError
from ember.compiler.targets import get_target
from ember.runtime.pipelines import PIPELINE_REGISTRY, ModelSource, PipelineConfig, SupportedArchitecture
from ember.runtime.compile_cache import compile_options, compile_source, ensure_artifact, source_sha256
from ember.runtime.pipelines.config import upper_bounded_default
from ember.runtime.session import parse_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileResult:
    path: Path
    compiled: bool  # False when the compile cache already held it
    seconds: float  # compile time, or verification time when found in the cache
    architecture: str
    verification: dict[str, Any] | None = None  # the manifest's accuracy figures, when measured


def architecture_for(source: ModelSource) -> SupportedArchitecture:
    """The registry entry for a model source; a ValueError naming the supported ones when none fits."""
    if source.kind == "artifact":
        raise ValueError(f"{source.path} is already a compiled ember artifact")
    name = source.architecture_name()
    architecture = PIPELINE_REGISTRY.architectures.get(name) if name else None
    if architecture is None:
        raise ValueError(f"architecture {name!r} of {source.path} is not supported; supported: "
                         f"{', '.join(PIPELINE_REGISTRY.supported_names())}")
    return architecture


def _check_output_dir(directory: Path, force: bool) -> None:
    """Refuse to overwrite anything but an ember artifact, and that only with ``force``; and a folder that cannot
    be written into, before compiling rather than after (``artifact_lock.check_writable``)."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        artifact_lock.check_writable(directory)
    except OSError as error:
        raise ValueError(f"cannot write the artifact into {directory.parent}: {error.strerror or error}") from None
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    if not any(directory.iterdir()):
        directory.rmdir()
        return
    if not (directory / MANIFEST).is_file():
        raise ValueError(f"{directory} exists and is not an ember artifact; choose an empty or new directory")
    if not force:
        raise ValueError(f"{directory} already holds an artifact; pass --force to replace it")


def compile_model(model: str | Path, output_dir: str | Path | None = None, *, target: str = "ort-cpu",
                  device: str | None = None, encoding: str | None = None, kv_cache_strategy: str | None = None, max_length: int | None = None,
                  force: bool = False, cache_dir: str | Path | None = None,
                  kv_cache_bit_width: int = 0, verify: bool = False, tensor_parallel: int = 1,
                  decode_slots: int | None = None) -> CompileResult:
    """Compile ``model`` (an HF directory or a .gguf file) into ``output_dir``, or into the compile cache; with
    ``verify`` (``ember compile`` unless ``--no-verify``), measure a quantized artifact's accuracy if its
    manifest has no figures yet. ``decode_slots``: a paged artifact holds the decode slots' graph when it is above
    0, or None where they can serve (``PipelineConfig.decode_slots``)."""
    config = PipelineConfig(model_path=model, target=target, device=device, encoding=encoding,
                            kv_cache_strategy=kv_cache_strategy,
                            max_length=max_length, cache_dir=cache_dir, force_compile=force,
                            kv_cache_bit_width=kv_cache_bit_width, tensor_parallel=tensor_parallel,
                            decode_slots=decode_slots)
    source = ModelSource.resolve(model)
    architecture = architecture_for(source)
    options = compile_options(config, architecture, source)  # with the encoders' pooling options
    options.validate()
    kind = get_target(options.target).device_kind
    if device is not None and parse_device(device).kind != kind:
        raise ValueError(f"--device {device}: target {options.target} compiles for {kind} devices")
    if max_length is not None:
        # The graph's sequence dimension is symbolic; the limit is checked here and applied at run time.
        upper_bounded_default(source.hf_config().max_position_embeddings, max_length)
    if output_dir is None:
        resolved = ensure_artifact(config, architecture, source)
        _build_tensorrt_engine(resolved.artifact, device, max_length)
        result = CompileResult(Path(resolved.artifact.path), resolved.compiled, resolved.seconds, architecture.name)
        return _with_verification(result, resolved.artifact.manifest, config) if verify else result
    directory = Path(output_dir).expanduser().resolve()
    _check_output_dir(directory, force)
    start = time.perf_counter()
    sha = source_sha256(source, Path(config.cache_dir))
    artifact = compile_source(source, architecture, options, directory, sha)
    _build_tensorrt_engine(artifact, device, max_length)
    seconds = time.perf_counter() - start
    logger.info("compiled %s into %s in %.2f s", source.path, artifact.path, seconds)
    result = CompileResult(Path(artifact.path), True, seconds, architecture.name)
    return _with_verification(result, artifact.manifest, config) if verify else result


def _build_tensorrt_engine(artifact: Artifact, device: str | None, max_length: int | None) -> Path | None:
    """``--target tensorrt``: the engine for the GPU ``--device`` names (cuda:0 by default), built into the artifact
    now where this machine has that GPU and TensorRT; else a warning that the first load on a GPU builds it (the
    artifact holds one engine per GPU kind: ``ember.compiler.engine_files``)."""
    if artifact.manifest.get("runtime", {}).get("backend") != "tensorrt":
        return None
    from ember.compiler.cuda_device import CudaUnavailable, probe_cuda_device
    from ember.compiler.tensorrt_engine import TensorRTUnavailable, ensure_engine
    from ember.runtime.backends.tensorrt import engine_limits

    index = parse_device(device).id if device else 0
    try:
        description = probe_cuda_device(index)
        limits = engine_limits(artifact.manifest, {"max_length": max_length} if max_length else {})
        path = ensure_engine(artifact, description, **limits)
    except (CudaUnavailable, TensorRTUnavailable) as error:
        logger.warning("no TensorRT engine built for cuda:%d: %s; the first load on a GPU builds and records it "
                       "in %s", index, error, artifact.path)
        return None
    logger.info("TensorRT engine for %s: %s", description.kind_key, path)
    return path


def _with_verification(result: CompileResult, manifest: dict[str, Any], config: PipelineConfig) -> CompileResult:
    """The result with the artifact's accuracy figures: those in its manifest, or measured now (short form)."""
    from ember.runtime.backends.cuda_memory import DeviceUnavailable

    from .verify import needs_verification, record_verification

    if not needs_verification(manifest):
        return replace(result, verification=manifest.get("verification"))
    try:
        figures = record_verification(result.path, cache_dir=Path(config.cache_dir))
    except (ValueError, OSError, ArtifactError, DeviceUnavailable) as error:  # the artifact stays usable, unmeasured
        logger.warning("%s: accuracy not measured: %s", result.path, error)
        return result
    return replace(result, verification=figures)
