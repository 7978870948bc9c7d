"""The artifact's integrity checks, on small artifacts written by ``write_artifact`` with crafted files (no model
is compiled): paths that leave the artifact, flipped bytes whose mtime was put back, an edited manifest, files
added after the compile, and ``update_manifest`` keeping a sealed manifest valid. Hostile manifests are resealed
(``sealed``), as their author would, so that each check is shown to hold on its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from ember.compiler import artifact_lock
from ember.compiler.artifact import (MANIFEST, Artifact, ArtifactError, read_manifest, sealed, update_manifest,
                                     verify_artifact, write_artifact)
from ember.compiler.hashing import sha256_file

DATA_BYTES = 4 << 20


def populate(tmp: Path) -> dict:
    (tmp / "rank0").mkdir()
    (tmp / "rank0" / "model.onnx").write_bytes(b"not really onnx")
    (tmp / "rank0" / "model.onnx.data").write_bytes(np.random.default_rng(0).bytes(DATA_BYTES))
    (tmp / "config.json").write_text("{}")
    (tmp / "tokenizer").mkdir()
    (tmp / "tokenizer" / "tokenizer.json").write_text("{}")
    return {"architecture": "LlamaForCausalLM", "kv_params": {"n_kv_heads": 2, "num_layers": 3},
            "ranks": [{"rank": 0, "model": "rank0/model.onnx"}]}


@pytest.fixture
def artifact(tmp_path) -> Path:
    return write_artifact(tmp_path / "artifact", populate).path


def manifest_of(artifact: Path) -> dict:
    return json.loads((artifact / MANIFEST).read_text())


def reseal(artifact: Path, manifest: dict) -> None:
    """Write ``manifest`` with a valid seal: what a hostile author can always do."""
    (artifact / MANIFEST).write_text(json.dumps(sealed(manifest)))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_written_artifact_verifies_and_leaves_nothing_beside_it(artifact):
    manifest = verify_artifact(artifact).manifest
    assert manifest["manifest_sha256"] and set(manifest["files"]) == {
        "rank0/model.onnx", "rank0/model.onnx.data", "config.json", "tokenizer/tokenizer.json"}
    assert sorted(p.name for p in artifact.parent.iterdir()) == [".artifact.lock", "artifact"]


@pytest.mark.parametrize("path", ["../../../../etc/passwd", "/etc/shadow", "rank0/../../outside", "tokenizer/../.."])
def test_files_outside_the_artifact_are_refused_unread(artifact, path):
    manifest = manifest_of(artifact)
    manifest["files"][path] = {"sha256": "0" * 64, "size": 1}
    reseal(artifact, manifest)
    with pytest.raises(ArtifactError) as error:
        verify_artifact(artifact)
    message = one_line(error)
    assert str(artifact) in message and repr(path) in message and "not a relative path inside" in message
    assert "bytes" not in message  # nothing about the target (its size) leaks


def test_a_link_that_leads_out_is_refused(artifact, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("the size and hash of this file are right, its place is not")
    (artifact / "tokenizer" / "special.json").symlink_to(secret)
    manifest = manifest_of(artifact)
    manifest["files"]["tokenizer/special.json"] = {"sha256": sha256_file(secret), "size": secret.stat().st_size}
    reseal(artifact, manifest)
    with pytest.raises(ArtifactError, match=r"file 'tokenizer/special.json' leads out of the artifact"):
        verify_artifact(artifact)


def test_a_rank_model_outside_or_unverified_is_refused(artifact, tmp_path):
    outside = tmp_path / "model.onnx"
    outside.write_bytes(b"elsewhere")
    for model, reason in [(str(outside), "not a relative path inside"), ("../model.onnx", "not a relative path"),
                          ("rank0/model.onnx.data2", "not among the files the manifest verifies")]:
        manifest = manifest_of(artifact)
        manifest["ranks"][0]["model"] = model
        reseal(artifact, manifest)
        with pytest.raises(ArtifactError, match=reason):
            verify_artifact(artifact)
        if ".." in model or model.startswith("/"):
            # an Artifact made from a manifest that was never verified still does not hand out a path outside
            with pytest.raises(ArtifactError, match="rank model"):
                Artifact(artifact, manifest).rank_model(0)


def test_flipped_bytes_with_their_mtime_restored_are_found(artifact):
    verify_artifact(artifact)  # the memo now remembers every file
    data = artifact / "rank0" / "model.onnx.data"
    before = data.stat()
    time.sleep(0.05)  # past the kernel's timestamp tick, so that the write's ctime differs (hashing.py: the limit)
    with open(data, "r+b") as f:
        f.seek(DATA_BYTES // 2)
        chunk = f.read(1 << 20)
        f.seek(DATA_BYTES // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (data.stat().st_size, data.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(ArtifactError) as error:
        verify_artifact(artifact)
    assert one_line(error) == (f"artifact {artifact}: file rank0/model.onnx.data does not match its sha256 in the "
                               f"manifest")


def test_a_copied_artifact_is_hashed_again_not_trusted_by_path(artifact, tmp_path):
    verify_artifact(artifact)
    data = artifact / "rank0" / "model.onnx.data"
    replacement = tmp_path / "replacement"
    replacement.write_bytes(bytes(DATA_BYTES))
    before = data.stat()
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, data)  # same path, size and mtime; another inode
    with pytest.raises(ArtifactError, match="rank0/model.onnx.data does not match"):
        verify_artifact(artifact)


@pytest.mark.parametrize("key, value", [("kv_params", {"n_kv_heads": 4, "num_layers": 3}),
                                        ("kv_params", {"n_kv_heads": 2, "num_layers": 30})])
def test_an_edited_manifest_is_named(artifact, key, value):
    manifest = manifest_of(artifact)
    manifest[key] = value
    (artifact / MANIFEST).write_text(json.dumps(manifest, indent=2))  # valid JSON, not resealed
    with pytest.raises(ArtifactError) as error:
        verify_artifact(artifact)
    assert one_line(error) == (f"{artifact / MANIFEST} was edited or damaged: its content does not match its "
                               f"manifest_sha256; recompile the model")


@pytest.mark.parametrize("change, match", [
    (lambda m: m.pop("manifest_sha256"), "was edited or damaged"),
    (lambda m: m.update(schema_version=1), "schema version 1 is not the supported 2; recompile the model"),
    (lambda m: m["files"].update({"config.json": {"size": "2"}}), "entry for file 'config.json' is not a size"),
    (lambda m: m["files"].update({".verified.json": {"size": 2, "sha256": "0"}}), "entry for file '.verified.json'"),
    (lambda m: m.update(files=["config.json"]), "files or ranks are not a table and a list"),
])
def test_malformed_manifests_are_one_line_errors(artifact, change, match):
    manifest = manifest_of(artifact)
    change(manifest)
    (artifact / MANIFEST).write_text(json.dumps(manifest if "manifest_sha256" not in manifest
                                                else sealed(manifest)))
    with pytest.raises(ArtifactError, match=match) as error:
        verify_artifact(artifact)
    one_line(error)


def test_a_file_added_after_the_compile_is_named(artifact):
    (artifact / "tokenizer" / "chat_template.jinja").write_text("{{ 'injected' }}")
    with pytest.raises(ArtifactError, match="file tokenizer/chat_template.jinja is not in the manifest"):
        verify_artifact(artifact)


def test_update_manifest_keeps_the_seal_and_does_not_bless_edits(artifact):
    seal = manifest_of(artifact)["manifest_sha256"]
    updated = update_manifest(artifact, {"verification": {"max_rel_error": 0.1, "passed": True}})
    assert updated.manifest["manifest_sha256"] == manifest_of(artifact)["manifest_sha256"] != seal
    assert verify_artifact(artifact).manifest["verification"]["max_rel_error"] == 0.1
    assert read_manifest(artifact) == updated.manifest
    for key in ("files", "schema_version", "manifest_sha256"):
        with pytest.raises(ArtifactError, match=key):
            update_manifest(artifact, {key: {}})
    edited = manifest_of(artifact)
    edited["kv_params"]["n_kv_heads"] = 8
    (artifact / MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="was edited or damaged"):
        update_manifest(artifact, {"note": 1})  # an edited manifest is not resealed by the next update


def test_replacing_moves_the_old_artifact_aside_and_refuses_other_folders(artifact, tmp_path):
    first = manifest_of(artifact)["created"], (artifact / "rank0" / "model.onnx.data").stat().st_ino
    replaced = write_artifact(artifact, populate)
    assert verify_artifact(replaced.path).manifest["files"] == manifest_of(artifact)["files"]
    assert (artifact / "rank0" / "model.onnx.data").stat().st_ino != first[1]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")] == []
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an artifact")
    with pytest.raises(ArtifactError, match=f"{folder} exists and is not an ember artifact"):
        write_artifact(folder, populate)
    assert (folder / "notes.txt").read_text() == "not an artifact"
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")] == []


HOLD_LOCK = """
import sys
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def lock_held_elsewhere(directory: Path) -> Iterator[None]:
    """``directory``'s artifact lock, held by another process (a writer at work) until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(artifact_lock.lock_path(directory))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate("", timeout=30)


def test_stale_temporary_folders_go_and_those_of_a_living_writer_stay(tmp_path):
    parent = tmp_path / "artifacts"
    parent.mkdir()
    dead = [parent / ".a-1.tmp-abcd1234", parent / ".a-1.old-zz_99xyz", parent / ".b-2.tmp-00000000"]
    alive = parent / ".c-3.tmp-12345678"
    unrelated = [parent / ".a-1.backup", parent / "a-1", parent / ".d-4.tmp-short"]
    for folder in [*dead, alive, *unrelated]:
        folder.mkdir()
        (folder / "weights.bin").write_bytes(bytes(1024))
    with lock_held_elsewhere(parent / "c-3"):
        removed = artifact_lock.remove_stale_temps(parent)
    assert sorted(removed) == sorted(dead)
    assert all(not p.exists() for p in dead) and alive.is_dir() and all(p.is_dir() for p in unrelated)
    assert artifact_lock.remove_stale_temps(parent) == [alive]  # its writer is gone now
