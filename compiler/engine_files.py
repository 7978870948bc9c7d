"""TensorRT engines in an artifact: one file per device kind, and the manifest table that says which is which.

An artifact of the ``tensorrt`` target holds the TensorRT-ready ONNX graph (``rank0/model.onnx``) and, next to it,
``engines/<device kind>-trt<TensorRT version>.plan`` for each GPU model it has been run on: built by
``ember compile --target tensorrt --device cuda:N`` for that device, or at load time on a device that has none
yet (``compiler/tensorrt_engine.py``). So one artifact directory serves several GPU models.

Each engine has an entry in the manifest's ``engines`` table (``compiler/artifact.py`` says why that table and not
``files``)::

    "engines": {"engines/nvidia-h100-80gb-hbm3-sm90-trt10.16.1.11.plan": {
        "size": ..., "sha256": ...,                       # verified like every file of the artifact
        "device": {"kind": "nvidia-h100-80gb-hbm3-sm90", "name": ..., "sm_major": 9, "sm_minor": 0,
                   "total_memory": ...},
        "tensorrt_version": "10.16.1.11",
        "model": "rank0/model.onnx", "model_sha256": ...,  # the graph it was built from
        "profile": {"input_ids": {"min": [1, 1], "opt": [8, 1], "max": [8, 256]}, ...},
        "fp16": true}}

An engine is used only for exactly its device kind, its TensorRT version (a plan does not load in another
version; TensorRT refuses it, or worse, on some versions, loads it) and the graph it was built from (the
``files`` sha256 of the rank model now). Any other is stale: :func:`select_engine` never returns it and says why,
and :func:`record_engine` replaces it. This module is the format only: it imports neither TensorRT nor the
compiler's passes, so the runtime may import it to pick an engine.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import artifact_lock
from .artifact import (ENGINES, ENGINES_DIR, Artifact, ArtifactError, check_file, read_manifest, remember_sha256,
                       set_engines)
from .cuda_device import DeviceDescription

logger = logging.getLogger(__name__)

#: One input's (min, opt, max) shapes.
ProfileShapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
#: An optimization profile: input name -> (min, opt, max) shapes.
Profile = Mapping[str, ProfileShapes]

#: The distributions that install the ``tensorrt`` module, in the order looked for (the pip packages per CUDA major
#: version; ``tensorrt`` is the meta-package on PyPI and the name of the wheel in NVIDIA's archives).
TENSORRT_DISTRIBUTIONS = ("tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt")


def engine_file_name(device: DeviceDescription, trt_version: str) -> str:
    """The artifact path of the engine for ``device``'s kind built with TensorRT ``trt_version``
    (``engines/nvidia-h100-80gb-hbm3-sm90-trt10.16.1.11.plan``)."""
    version = re.sub(r"[^A-Za-z0-9.]+", "-", trt_version).strip("-.")
    if not version:
        raise ValueError(f"{trt_version!r} is not a TensorRT version")
    return f"{ENGINES_DIR}/{device.kind_key}-trt{version}.plan"


def installed_tensorrt_version() -> str | None:
    """The version of the installed ``tensorrt`` package, read from its metadata (TensorRT is not loaded: cheap,
    and the same on a machine without a GPU); None when none is installed."""
    for name in TENSORRT_DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def engine_key_material(trt_version: str | None) -> dict[str, str]:
    """What the compile cache's key adds for a target whose runtime is TensorRT: the TensorRT version (from
    :func:`installed_tensorrt_version`). The GPU model is left out on purpose: the engines for each kind live in the
    one artifact (this module), so a second GPU model finds the same artifact and adds its engine, instead of
    compiling and storing the whole ONNX graph again."""
    return {"tensorrt": trt_version or "not installed"}


def profile_to_json(profile: Profile) -> dict[str, dict[str, list[int]]]:
    """The manifest form of an optimization profile: ``{input: {"min": [...], "opt": [...], "max": [...]}}``."""
    return {name: {"min": list(low), "opt": list(opt), "max": list(high)}
            for name, (low, opt, high) in sorted(profile.items())}


def profile_from_json(table: Mapping[str, Any]) -> dict[str, ProfileShapes]:
    return {name: (tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"])) for name, shapes in table.items()}


def profile_covers(built: Profile, wanted: Profile) -> bool:
    """Whether an engine built with profile ``built`` accepts every shape profile ``wanted`` allows: the same inputs,
    and each dimension's range within the built one (the ``opt`` shapes only tune kernels)."""
    if set(built) != set(wanted):
        return False
    for name, (low, _, high) in wanted.items():
        built_low, _, built_high = built[name]
        same_rank = len(low) == len(built_low) == len(high) == len(built_high)
        if not (same_rank and all(b <= w for b, w in zip(built_low, low))
                and all(w <= b for b, w in zip(built_high, high))):
            return False
    return True


@dataclass(frozen=True)
class EngineChoice:
    """What :func:`find_engine` found: the engine to load, or None and why none is."""

    path: Path | None
    reason: str


def _model(artifact_dir: Path, manifest: Mapping[str, Any]) -> tuple[str, str]:
    """The rank model the engines are built from and its sha256 now (single rank: the tensorrt target's form)."""
    ranks = manifest.get("ranks") or []
    if len(ranks) != 1:
        raise ArtifactError(f"artifact {artifact_dir}: TensorRT engines are built from one rank's model; this "
                            f"artifact has {len(ranks)} ranks")
    model = ranks[0]["model"]
    return model, manifest["files"][model]["sha256"]


def _kind(entry: Any) -> Any:
    """The device kind an engines-table entry records (None if it records none)."""
    device = entry.get("device") if isinstance(entry, dict) else None
    return device.get("kind") if isinstance(device, dict) else None


def find_engine(artifact: Artifact, device: DeviceDescription, trt_version: str, *,
                profile: Profile | None = None, fp16: bool | None = None) -> EngineChoice:
    """The engine of ``artifact`` for exactly ``device``'s kind, TensorRT ``trt_version`` and the rank model the
    manifest verifies now, its file checked against its entry (size and sha256); with ``profile``, only one whose
    profile covers it, with ``fp16``, only one built so. Else no path and the reason."""
    directory = artifact.path
    engines = artifact.manifest.get(ENGINES, {})
    rel = engine_file_name(device, trt_version)
    entry = engines.get(rel)
    if entry is None:
        others = sorted(f"{r} (TensorRT {e.get('tensorrt_version')})" for r, e in engines.items()
                        if _kind(e) == device.kind_key)
        if others:
            return EngineChoice(None, f"the engines for {device.kind_key} in {directory} were built with another "
                                      f"TensorRT than {trt_version}: {', '.join(others)}; stale, not loaded")
        return EngineChoice(None, f"{directory} has no engine for {device.kind_key} with TensorRT {trt_version}")
    model, model_sha256 = _model(directory, artifact.manifest)
    if _kind(entry) != device.kind_key or entry.get("tensorrt_version") != trt_version:
        return EngineChoice(None, f"engine {rel} of {directory} says it was built for {_kind(entry)} with TensorRT "
                                  f"{entry.get('tensorrt_version')}, not what its name says; not loaded")
    if entry.get("model") != model or entry.get("model_sha256") != model_sha256:
        return EngineChoice(None, f"engine {rel} of {directory} was built from another {model} (sha256 "
                                  f"{str(entry.get('model_sha256'))[:12]}, now {model_sha256[:12]}); stale, "
                                  f"not loaded")
    if fp16 is not None and entry.get("fp16") != fp16:
        return EngineChoice(None, f"engine {rel} of {directory} was built with fp16={entry.get('fp16')}, "
                                  f"fp16={fp16} is asked; not loaded")
    if profile is not None and not profile_covers(profile_from_json(entry.get("profile", {})), profile):
        return EngineChoice(None, f"engine {rel} of {directory} was built for the shapes "
                                  f"{entry.get('profile')}, which do not cover {profile_to_json(profile)}; "
                                  f"not loaded")
    try:
        path = check_file(directory, rel, entry)
    except ArtifactError as error:
        return EngineChoice(None, f"{error}; not loaded")
    return EngineChoice(path, f"engine {rel} of {directory} for {device.kind_key} with TensorRT {trt_version}")


def select_engine(artifact: Artifact, device: DeviceDescription, trt_version: str, *,
                  profile: Profile | None = None, fp16: bool | None = None) -> Path | None:
    """The verified engine for ``device``'s kind and TensorRT ``trt_version`` (:func:`find_engine`), or None, with
    the reason logged; a stale engine is never returned."""
    choice = find_engine(artifact, device, trt_version, profile=profile, fp16=fp16)
    if choice.path is None:
        logger.info("%s", choice.reason)
    return choice.path


def record_engine(directory: str | Path, device: DeviceDescription, trt_version: str, engine_bytes: bytes,
                  profile: Profile, *, fp16: bool = False) -> Artifact:
    """Add the engine ``engine_bytes`` (a serialized TensorRT plan) built for ``device``'s kind with TensorRT
    ``trt_version`` from the artifact's rank model now, and return the artifact with its resealed manifest.

    Under the artifact's lock (:mod:`.artifact_lock`): the file is written beside the artifact in a temporary folder
    (which :func:`artifact_lock.remove_stale_temps` removes if this process is killed) and renamed into
    ``engines/``; then the manifest's table lists it (:func:`artifact.set_engines`, which checks the file first);
    then the files of the entries it replaces are deleted: every other engine of this device kind (another TensorRT
    version), every engine built from another model, which no one can load any more, and every engine whose file
    no longer verifies. A crash between the rename and the manifest leaves a file the manifest does not list (or
    does not match): the artifact then fails verification, naming it, and the compile cache compiles it again; the
    manifest never names a file that does not verify."""
    directory = Path(directory)
    digest = hashlib.sha256(engine_bytes).hexdigest()
    with artifact_lock.holding(directory):
        manifest = read_manifest(directory)
        model, model_sha256 = _model(directory, manifest)
        rel = engine_file_name(device, trt_version)
        engines = dict(manifest.get(ENGINES, {}))
        replaced = [r for r, e in engines.items() if r != rel and (
            _kind(e) == device.kind_key or e.get("model_sha256") != model_sha256)]
        for other in sorted(engines.keys() - replaced - {rel}):
            try:
                check_file(directory, other, engines[other])
            except ArtifactError as error:
                logger.warning("%s; removing it", error)
                replaced.append(other)
        temp = artifact_lock.new_temp_dir(directory)
        try:
            with open(temp / "engine.plan", "wb") as out:
                out.write(engine_bytes)
                out.flush()
                os.fsync(out.fileno())
            (directory / ENGINES_DIR).mkdir(exist_ok=True)
            os.replace(temp / "engine.plan", directory / rel)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        remember_sha256(directory, rel, digest)
        for stale in replaced:
            del engines[stale]
        engines[rel] = {"size": len(engine_bytes), "sha256": digest, "device": device.to_json(),
                        "tensorrt_version": trt_version, "model": model, "model_sha256": model_sha256,
                        "profile": profile_to_json(profile), "fp16": fp16}
        try:
            artifact = set_engines(directory, engines)
        except BaseException:
            if rel not in manifest.get(ENGINES, {}):  # leave no file the manifest does not list
                (directory / rel).unlink(missing_ok=True)
            raise
        for stale in replaced:
            (directory / stale).unlink(missing_ok=True)
            logger.info("removed the stale engine %s of %s", stale, directory)
    logger.info("recorded engine %s of %s (%d bytes)", rel, directory, len(engine_bytes))
    return artifact
