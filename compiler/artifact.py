"""The artifact directory: what a compile writes and a session loads (DESIGN.md: artifacts).

Layout::

    manifest.json            schema and ember versions, source and its hashes, architecture, task,
                             encoding, KV strategy, target, ranks, graph I/O, KV parameters, limits,
                             and the sha256 and size of every other file
    config.json              the model's Hugging Face config (the runtime needs no source checkpoint)
    tokenizer/               tokenizer files, chat template, generation config
    rank<N>/model.onnx(+ .data)
    engines/<kind>-trt<version>.plan   TensorRT engines, one per device kind, added after the compile

An artifact is written into a temporary sibling directory and renamed into place, under the artifact's
cross-process lock (:mod:`.artifact_lock`: who may write, and how the temporary folders of a killed writer are
found and removed), so a crash leaves nothing half-written under the final name. :func:`verify_artifact` checks
every file against the manifest, and that the artifact holds no file the manifest does not list, and names the
first that does not match. Verification results are remembered per file by device, inode, size, mtime and
ctime (``.verified.json``; ``compiler/hashing.py`` says why mtime alone is not enough), so loading an unchanged
artifact does not re-hash gigabytes.

The manifest records the sha256 of its own canonical body (``manifest_sha256``): a damaged or hand-edited
manifest (an edited ``n_kv_heads``) is an error naming it, not a traceback at the first step. That is a checksum,
not a signature (whoever edits on purpose can reseal). Against a hostile artifact the rule is on paths, checked
on the manifest before anything it names is opened: every path (``files``, ``ranks[].model``) must be relative and
stay inside the artifact, links included, and every rank's model must be among the verified files
(``../../etc/shadow`` is refused without being read).

Engines (``engines/*.plan``) are listed in the manifest's own ``engines`` table, not in ``files``, and verified the
same way (size and sha256; a file in ``engines/`` that the table does not list is refused like any other). They
differ from ``files`` in who writes them and when: ``files`` is what the compile produced, sealed once and never
changed after (:func:`update_manifest` refuses to touch it), while an engine is built later, on whichever GPU loads
the artifact first, and a stale one is replaced; so only :func:`set_engines` changes that table, under the
artifact's lock, after the engine file is in place. What an entry means beyond its file (device kind, TensorRT
version, the model it was built from) is :mod:`.engine_files`' business.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from . import artifact_lock
from .hashing import HashMemo

SCHEMA_VERSION = 2  # 2: the manifest hashes itself (manifest_sha256); paths checked to stay inside
MANIFEST = "manifest.json"
_VERIFIED = ".verified.json"
_SEAL = "manifest_sha256"
#: The manifest's table of TensorRT engine files (module docstring) and the folder they lie in.
ENGINES = "engines"
ENGINES_DIR = "engines"
#: Names the manifest may not list: itself, and the verification memo (rewritten on every load).
_RESERVED = frozenset({MANIFEST, _VERIFIED})


class _FileEntry(TypedDict):
    """An entry of the manifest's ``files`` table, as :func:`write_artifact` makes it."""

    sha256: str
    size: int


class ArtifactError(RuntimeError):
    """An artifact that cannot be used: missing, of another schema, or whose files do not match."""


@dataclass(frozen=True)
class Artifact:
    """A verified artifact directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    def rank_model(self, rank: int = 0) -> Path:
        """The rank's model file, which must lie inside the artifact (an Artifact may be built from a manifest
        that was only read, not verified)."""
        return _inside(self.path, self.manifest["ranks"][rank]["model"], "rank model")

    def rank_stages(self, rank: int = 0) -> list[tuple[Path, list[dict[str, Any]]]]:
        """A tensor-parallel rank's stage models, each with the collectives that run after it (one stage, the rank's
        model, with none, for an artifact that was not cut: ``compiler/passes/cut_at_collectives.py``)."""
        entry = self.manifest["ranks"][rank]
        stages = entry.get("stages") or [{"model": entry["model"], "collectives_after": []}]
        return [(_inside(self.path, stage["model"], "stage model"), list(stage.get("collectives_after", [])))
                for stage in stages]

    def slot_graph_view(self) -> "Artifact | None":
        """The decode slots' continuous graph of a paged artifact compiled with one (``compiler/slot_graph.py``),
        as an artifact whose manifest describes that graph (the same files: load it through a fork of the paged
        model's binding); None when it has none."""
        block = self.manifest.get("slot_graph")
        return None if block is None else Artifact(self.path, {**self.manifest, **block["manifest"]})

    @property
    def world_size(self) -> int:
        """The ranks the model is split over (1: not split)."""
        return int(self.manifest.get("tensor_parallel", {}).get("world_size", 1))

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def hf_config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())


def write_artifact(final_dir: Path, populate: Callable[[Path], dict[str, Any]]) -> Artifact:
    """Create ``final_dir`` atomically: ``populate(tmp_dir)`` writes the files and returns the manifest body.

    Holds ``final_dir``'s lock throughout (:mod:`.artifact_lock`; the compile cache holds it already, around its
    check and compile): the temporary folder is built and published, and a previous artifact moved aside, by one
    process at a time, and temporary folders left by a killed writer are removed first. A folder that is not an
    ember artifact (no manifest) is never replaced."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with artifact_lock.holding(final_dir):
        artifact_lock.remove_stale_temps(final_dir.parent, held=final_dir.name)
        tmp = artifact_lock.new_temp_dir(final_dir)
        try:
            manifest = populate(tmp)
            files: dict[str, _FileEntry] = {}
            memo = HashMemo(tmp / _VERIFIED)
            for file in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != _VERIFIED):
                rel = file.relative_to(tmp).as_posix()
                files[rel] = {"sha256": memo.sha256(file), "size": file.stat().st_size}
            manifest = sealed({"schema_version": SCHEMA_VERSION,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest,
                               "files": files})
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
            # The memo recorded absolute paths inside tmp; verification re-records them after the rename.
            (tmp / _VERIFIED).unlink(missing_ok=True)
            if os.path.lexists(final_dir) and (not final_dir.is_dir() or final_dir.is_symlink() or (
                    any(final_dir.iterdir()) and not (final_dir / MANIFEST).exists())):
                raise ArtifactError(f"{final_dir} exists and is not an ember artifact (no {MANIFEST}); not "
                                    f"replacing it")
            artifact_lock.publish(tmp, final_dir)
            memo = HashMemo(final_dir / _VERIFIED)
            for rel, entry in files.items():
                memo.record(final_dir / rel, entry["sha256"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Artifact(final_dir, manifest)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of the artifact in ``directory``, checked on its own (schema, seal, paths: the module
    docstring); every fault is an ArtifactError of one line that names the file."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is not an ember artifact: no {MANIFEST}") from None
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read: {e.strerror or e}") from None
    except ValueError as e:
        raise ArtifactError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path}: schema version {version} is not the supported {SCHEMA_VERSION}; "
                            f"recompile the model")
    if manifest.get(_SEAL) != manifest_digest(manifest):
        raise ArtifactError(f"{path} was edited or damaged: its content does not match its {_SEAL}; recompile the "
                            f"model")
    _check_paths(Path(directory), manifest)
    return manifest


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest. The body goes through JSON once first, so
    that what is sealed in memory (tuples, integer keys) hashes as what is read back from the file."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != _SEAL}))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its digest (written last, so every other key is covered)."""
    return {**{k: v for k, v in manifest.items() if k != _SEAL}, _SEAL: manifest_digest(manifest)}


def _inside(directory: Path, rel: Any, what: str) -> Path:
    """``directory / rel`` if ``rel`` is a relative path that stays inside ``directory``; else ArtifactError."""
    if not isinstance(rel, str) or not Path(rel).parts or Path(rel).is_absolute() or ".." in Path(rel).parts \
            or "\\" in rel or "\0" in rel:
        raise ArtifactError(f"artifact {directory}: {what} {rel!r} is not a relative path inside the artifact")
    path = directory / rel
    try:
        inside = path.resolve().is_relative_to(directory.resolve())  # not a link inside that points out
    except (OSError, RuntimeError):  # a link loop
        inside = False
    if not inside:
        raise ArtifactError(f"artifact {directory}: {what} {rel!r} leads out of the artifact")
    return path


def _check_paths(directory: Path, manifest: dict[str, Any]) -> None:
    """Every path the manifest names is inside the artifact and every rank's model is among the verified files;
    checked on the manifest alone, before any of them is opened."""
    files, ranks = manifest.get("files"), manifest.get("ranks", [])
    if not isinstance(files, dict) or not isinstance(ranks, list):
        raise ArtifactError(f"artifact {directory}: the manifest's files or ranks are not a table and a list")
    for rel, entry in files.items():
        _inside(directory, rel, "file")
        if rel in _RESERVED or not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                                    and isinstance(entry.get("sha256"), str)):
            raise ArtifactError(f"artifact {directory}: the manifest's entry for file {rel!r} is not a size and a "
                                f"sha256 of a file of the artifact")
    for rank in ranks:
        model = rank.get("model") if isinstance(rank, dict) else None
        stages = rank.get("stages", []) if isinstance(rank, dict) else []
        if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
            raise ArtifactError(f"artifact {directory}: the manifest's stages of a rank are not a list of tables")
        for rel, what in [(model, "rank model")] + [(stage.get("model"), "stage model") for stage in stages]:
            _inside(directory, rel, what)
            if rel not in files:
                raise ArtifactError(f"artifact {directory}: {what} {rel!r} is not among the files the manifest "
                                    f"verifies")
    engines = manifest.get(ENGINES, {})
    if not isinstance(engines, dict):
        raise ArtifactError(f"artifact {directory}: the manifest's {ENGINES} is not a table")
    for rel in files:
        if Path(rel).parts[0] == ENGINES_DIR:
            raise ArtifactError(f"artifact {directory}: file {rel!r} is listed among the compiled files; engines "
                                f"belong in the manifest's {ENGINES} table")
    for rel, entry in engines.items():
        _inside(directory, rel, "engine")
        if len(Path(rel).parts) != 2 or Path(rel).parts[0] != ENGINES_DIR or not rel.endswith(".plan") \
                or not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                        and isinstance(entry.get("sha256"), str)):
            raise ArtifactError(f"artifact {directory}: the manifest's entry for engine {rel!r} is not a size and a "
                                f"sha256 of a file {ENGINES_DIR}/<name>.plan")


def check_file(directory: Path, rel: str, expected: dict[str, Any], memo: HashMemo | None = None) -> Path:
    """The file ``rel`` of the artifact in ``directory`` if it exists with the size and sha256 of its manifest
    entry ``expected`` (through the verification memo); else an ArtifactError of one line that names it."""
    file = _inside(directory, rel, "file")
    if not file.is_file():
        raise ArtifactError(f"artifact {directory}: file {rel} listed in the manifest is missing")
    size = file.stat().st_size
    if size != expected["size"]:
        raise ArtifactError(f"artifact {directory}: file {rel} has {size} bytes, the manifest says "
                            f"{expected['size']}")
    if (memo or HashMemo(directory / _VERIFIED)).sha256(file) != expected["sha256"]:
        raise ArtifactError(f"artifact {directory}: file {rel} does not match its sha256 in the manifest")
    return file


def remember_sha256(directory: Path, rel: str, digest: str) -> None:
    """Tell the verification memo the sha256 of a file just written into the artifact (hashed as it was written),
    so that the next verification does not read it again."""
    HashMemo(directory / _VERIFIED).record(directory / rel, digest)


def verify_artifact(directory: str | Path) -> Artifact:
    """The artifact, after checking its manifest (:func:`read_manifest`), that every file the manifest lists
    (``files`` and ``engines``) exists with its size and sha256, and that the artifact holds no other file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    memo = HashMemo(directory / _VERIFIED)
    listed = {**manifest["files"], **manifest.get(ENGINES, {})}
    for rel, expected in listed.items():
        check_file(directory, rel, expected, memo)
    unlisted = min(_present_files(directory) - listed.keys(), default=None)
    if unlisted is not None:  # the tokenizer's loader, for one, reads whatever its folder holds
        raise ArtifactError(f"artifact {directory}: file {unlisted} is not in the manifest (added after the "
                            f"compile)")
    return Artifact(directory, manifest)


#: ember's own bookkeeping in an artifact, outside the manifest: the verification memo and its temporary file,
#: and update_manifest's temporary file.
_SCRATCH = re.compile(r"^(?:manifest\.json|\.verified\.json|\.verified\.\d+\.tmp|\.manifest\.json\..+)$")


def _present_files(directory: Path) -> set[str]:
    """Every file and link in the artifact, as manifest paths, but ember's bookkeeping at the top."""
    present = set()
    for root, dirs, names in os.walk(directory):  # links to folders are listed in dirs, not followed
        rel_root = Path(root).relative_to(directory)
        for name in names + [d for d in dirs if (Path(root) / d).is_symlink()]:
            rel = (rel_root / name).as_posix()
            if not (rel_root == Path(".") and _SCRATCH.match(name)):
                present.add(rel)
    return present


#: Manifest keys that describe the files themselves; :func:`update_manifest` never changes them.
_FILE_KEYS = frozenset({"schema_version", "files", ENGINES, _SEAL})


def update_manifest(directory: str | Path, updates: dict[str, Any]) -> Artifact:
    """Add or replace top-level manifest entries that describe the artifact without changing its files (e.g.
    accuracy measured after the compile), atomically: a temporary file renamed over ``manifest.json``, so a
    reader sees the old manifest or the new one, never half of one. The manifest is checked first (an edited one
    is not blessed by resealing it) and resealed with the updates, so the artifact still verifies; the keys that
    verification reads (``schema_version``, ``files``, ``engines``, ``manifest_sha256``) are refused."""
    directory = Path(directory)
    touched = _FILE_KEYS.intersection(updates)
    if touched:
        raise ArtifactError(f"update_manifest may not change {', '.join(sorted(touched))}")
    return _replace_manifest(directory, sealed({**read_manifest(directory), **updates}))


def set_engines(directory: str | Path, engines: dict[str, dict[str, Any]]) -> Artifact:
    """Replace the manifest's ``engines`` table (module docstring) by ``engines`` and reseal it, atomically as
    :func:`update_manifest` does. The caller holds the artifact's lock (:mod:`.artifact_lock`) and has put every
    listed file in place already: each is checked against its entry (size and sha256) before the manifest names it,
    so a manifest never lists an engine that does not verify. Files the old table listed and the new one does not
    are the caller's to delete, after this returns."""
    directory = Path(directory)
    manifest = sealed({**read_manifest(directory), ENGINES: engines})
    _check_paths(directory, manifest)
    memo = HashMemo(directory / _VERIFIED)
    for rel, expected in engines.items():
        check_file(directory, rel, expected, memo)
    return _replace_manifest(directory, manifest)


def _replace_manifest(directory: Path, manifest: dict[str, Any]) -> Artifact:
    """Write the sealed ``manifest`` over ``manifest.json`` through a temporary file renamed over it."""
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
