"""The artifact directory: what a compile writes and a session loads (DESIGN.md: artifacts).

Layout::

    manifest.json            schema and ember versions, source and its hashes, architecture, task,
                             encoding, KV strategy, target, ranks, graph I/O, KV parameters, limits,
                             and the sha256 and size of every other file
    config.json              the model's Hugging Face config (the runtime needs no source checkpoint)
    tokenizer/               tokenizer files, chat template, generation config
    rank<N>/model.onnx(+ .data)

An artifact is written into a temporary sibling directory and renamed into place, so a crash leaves
nothing half-written under the final name. :func:`verify_artifact` checks every file against the
manifest and names the first that does not match. Verification results are remembered per file by
size and mtime (``.verified.json``), so loading an unchanged artifact does not re-hash gigabytes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hashing import HashMemo

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_VERIFIED = ".verified.json"


class ArtifactError(RuntimeError):
    """An artifact that cannot be used: missing, of another schema, or whose files do not match."""


@dataclass(frozen=True)
class Artifact:
    """A verified artifact directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    def rank_model(self, rank: int = 0) -> Path:
        return self.path / self.manifest["ranks"][rank]["model"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def hf_config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())


def write_artifact(final_dir: Path, populate: Callable[[Path], dict[str, Any]]) -> Artifact:
    """Create ``final_dir`` atomically: ``populate(tmp_dir)`` writes the files and returns the manifest body."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        manifest = populate(tmp)
        files = {}
        memo = HashMemo(tmp / _VERIFIED)
        for file in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != _VERIFIED):
            rel = file.relative_to(tmp).as_posix()
            files[rel] = {"sha256": memo.sha256(file), "size": file.stat().st_size}
        manifest = {"schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **manifest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
        # The memo recorded absolute paths inside tmp; verification re-records them after the rename.
        (tmp / _VERIFIED).unlink(missing_ok=True)
        if final_dir.exists():
            if any(final_dir.iterdir()) and not (final_dir / MANIFEST).exists():
                raise ArtifactError(f"{final_dir} exists and is not an ember artifact; not replacing it")
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        memo = HashMemo(final_dir / _VERIFIED)
        for rel, entry in files.items():
            memo.record(final_dir / rel, entry["sha256"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(final_dir, manifest)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is not an ember artifact: no {MANIFEST}") from None
    except ValueError as e:
        raise ArtifactError(f"{path} is corrupt: {e}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema version {manifest.get('schema_version')} is not the supported "
                            f"{SCHEMA_VERSION}; recompile the model")
    return manifest


def verify_artifact(directory: str | Path) -> Artifact:
    """The artifact, after checking that every file the manifest lists exists with its size and sha256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    memo = HashMemo(directory / _VERIFIED)
    for rel, expected in manifest["files"].items():
        file = directory / rel
        if not file.is_file():
            raise ArtifactError(f"artifact {directory}: file {rel} listed in the manifest is missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise ArtifactError(f"artifact {directory}: file {rel} has {size} bytes, the manifest says "
                                f"{expected['size']}")
        if memo.sha256(file) != expected["sha256"]:
            raise ArtifactError(f"artifact {directory}: file {rel} does not match its sha256 in the manifest")
    return Artifact(directory, manifest)


#: Manifest keys that describe the files themselves; :func:`update_manifest` never changes them.
_FILE_KEYS = frozenset({"schema_version", "files"})


def update_manifest(directory: str | Path, updates: dict[str, Any]) -> Artifact:
    """Add or replace top-level manifest entries that describe the artifact without changing its files (e.g.
    accuracy measured after the compile), atomically: a temporary file renamed over ``manifest.json``, so a
    reader sees the old manifest or the new one, never half of one. The manifest does not hash itself, so the
    artifact still verifies; keys that the verification reads (``schema_version``, ``files``) are refused."""
    directory = Path(directory)
    touched = _FILE_KEYS.intersection(updates)
    if touched:
        raise ArtifactError(f"update_manifest may not change {', '.join(sorted(touched))}")
    manifest = {**read_manifest(directory), **updates}
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=directory)
    try:
        os.fchmod(fd, (directory / MANIFEST).stat().st_mode & 0o777)  # mkstemp's 0600 would hide it from others
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(manifest, indent=2, sort_keys=False))
        os.replace(tmp, directory / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Artifact(directory, manifest)
