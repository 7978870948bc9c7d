"""The compile cache across processes and after damage: concurrent first runs compile once and all load;
a cached artifact that is damaged, half there, hand-edited or without its manifest is compiled again in place
(also by ``ember compile --force``); temporary folders of killed compiles are removed; a read-only cache fails
before compiling, naming the folder and EMBER_CACHE.

The model is the 1-layer random Llama of the ``ember models`` tests (numpy-written, no torch): a compile takes
a tenth of a second once imports are warm, so the concurrency test spends its time on real process starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ember.compiler import ArtifactError, verify_artifact
from ember.compiler.artifact import MANIFEST
from ember.tools.cli import main
from ember.tools.compile_model import compile_model

from ..compiler.test_artifact_integrity import lock_held_elsewhere
from ..tools.test_models_cli import write_tiny_llama

PROCESSES, ROUNDS, TIMEOUT_S = 3, 5, 240

# Each worker imports ember once, then per round: says it is ready, waits for the go file (so the three start
# together), resolves the model through the compile cache of that round (empty), generates two tokens from
# what it got, and prints one JSON line: whether it compiled (ResolvedArtifact.compiled), or its error.
WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig, SamplingParams

    model, root = sys.argv[1], Path(sys.argv[2])
    for turn in range(int(sys.argv[3])):
        print(json.dumps({"ready": turn}), flush=True)
        while not (root / f"go{turn}").exists():
            time.sleep(0.002)
        try:
            config = PipelineConfig(model_path=model, cache_dir=root / f"cache{turn}", max_batch_size=1)
            pipe = PIPELINE_REGISTRY.retrieve(config)[1]
            tokens = pipe.generate_tokens([[1, 5, 9]], SamplingParams(max_new_tokens=2, ignore_eos=True))
            resolved = pipe.pipeline_model.resolved
            print(json.dumps({"round": turn, "compiled": resolved.compiled, "tokens": tokens,
                              "path": str(resolved.artifact.path)}), flush=True)
        except Exception as error:
            print(json.dumps({"round": turn, "error": f"{type(error).__name__}: {error}"}), flush=True)
""")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def read_json_line(process: subprocess.Popen, stderr: Path) -> dict:
    line = process.stdout.readline()
    if not line:
        raise AssertionError(f"worker {process.pid} ended early: {stderr.read_text()[-2000:]}")
    return json.loads(line)


def test_concurrent_first_runs_compile_once_and_all_load(model, tmp_path):
    logs = [tmp_path / f"worker{i}.stderr" for i in range(PROCESSES)]  # files: a full pipe would block a worker
    handles = [log.open("w") for log in logs]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(model), str(tmp_path), str(ROUNDS)],
                                stdout=subprocess.PIPE, stderr=handle, text=True) for handle in handles]
    watchdog = threading.Timer(TIMEOUT_S, lambda: [w.kill() for w in workers])  # a hang fails, never blocks CI
    watchdog.start()
    try:
        for turn in range(ROUNDS):
            assert [read_json_line(w, log) for w, log in zip(workers, logs)] == [{"ready": turn}] * PROCESSES
            (tmp_path / f"go{turn}").touch()
            results = [read_json_line(w, log) for w, log in zip(workers, logs)]
            assert [r.get("error") for r in results] == [None] * PROCESSES, results
            assert sum(r["compiled"] for r in results) == 1, results
            assert len({r["path"] for r in results}) == 1 and len({str(r["tokens"]) for r in results}) == 1
            artifacts = tmp_path / f"cache{turn}" / "artifacts"
            assert [p.name for p in artifacts.iterdir() if p.is_dir()] == [Path(results[0]["path"]).name]
            verify_artifact(results[0]["path"])
    finally:
        watchdog.cancel()
        for w, handle in zip(workers, handles):
            w.kill()
            w.communicate()
            handle.close()


@pytest.fixture
def cached(model, tmp_path) -> Path:
    """The model compiled into a fresh cache: the artifact's folder."""
    result = compile_model(model, cache_dir=tmp_path / "cache")
    assert result.compiled
    return result.path


def flip_keeping_mtime(file: Path) -> None:
    before = file.stat()
    time.sleep(0.05)  # past the kernel's timestamp tick (compiler/hashing.py)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))


def edit_kv_heads(artifact: Path) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["kv_params"]["n_kv_heads"] += 1
    (artifact / MANIFEST).write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize("damage", [
    lambda a: (a / MANIFEST).unlink(),
    lambda a: (a / "rank0" / "model.onnx.data").unlink(),
    lambda a: flip_keeping_mtime(a / "rank0" / "model.onnx.data"),
    edit_kv_heads,
    lambda a: (a / "tokenizer" / "extra.json").write_text("{}"),
], ids=["no-manifest", "half-written", "flipped-mtime-restored", "edited-manifest", "added-file"])
def test_a_damaged_cached_artifact_is_compiled_again_in_place(model, cached, damage, caplog):
    damage(cached)
    with pytest.raises(ArtifactError):
        verify_artifact(cached)
    result = compile_model(model, cache_dir=cached.parent.parent)
    assert result.compiled and result.path == cached
    verify_artifact(cached)
    assert "compiling it again in place" in caplog.text
    assert [p.name for p in cached.parent.iterdir() if p.is_dir()] == [cached.name]


def test_compile_force_replaces_a_manifestless_and_a_valid_artifact(model, cached, monkeypatch, capsys):
    monkeypatch.setenv("EMBER_CACHE", str(cached.parent.parent))
    (cached / MANIFEST).unlink()
    assert main(["compile", str(model), "--force"]) == 0, capsys.readouterr().err
    verify_artifact(cached)
    inode = (cached / "rank0" / "model.onnx.data").stat().st_ino
    assert main(["compile", str(model), "--force"]) == 0, capsys.readouterr().err
    verify_artifact(cached)
    assert (cached / "rank0" / "model.onnx.data").stat().st_ino != inode  # compiled again, not kept
    assert main(["compile", str(model)]) == 0
    assert "already in the compile cache" in capsys.readouterr().err
    assert [p.name for p in cached.parent.iterdir() if p.is_dir()] == [cached.name]


def test_temporary_folders_of_killed_compiles_are_removed(model, cached):
    """What a compile killed while writing leaves (its temporary and moved-aside folders, lock released by the
    kernel) goes at the next use of the cache; the folder of a compile that is running (its lock held by a live
    process) stays."""
    artifacts = cached.parent
    killed = [artifacts / f".{cached.name}.tmp-k1ll3d00", artifacts / ".LlamaForCausalLM-0123.old-abcdefgh"]
    running = artifacts / ".LlamaForCausalLM-4567.tmp-runn1ng0"
    for folder in [*killed, running]:
        (folder / "rank0").mkdir(parents=True)
        (folder / "rank0" / "model.onnx.data").write_bytes(bytes(1 << 20))
    with lock_held_elsewhere(artifacts / "LlamaForCausalLM-4567"):
        assert not compile_model(model, cache_dir=artifacts.parent).compiled
    assert sorted(p.name for p in artifacts.iterdir() if p.is_dir()) == sorted([cached.name, running.name])


@pytest.fixture
def read_only(tmp_path):
    """``make(folder)`` makes a folder unwritable for this process: by its mode, or where the tests run as root
    (whom modes do not stop) by the immutable attribute; skipped where neither holds."""
    made = []

    def make(folder: Path) -> None:
        folder.chmod(0o555)
        made.append(folder)
        probe = folder / ".probe"
        try:
            probe.mkdir()
        except OSError:
            return
        probe.rmdir()
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a folder read-only here (root, and no chattr)")

    yield make
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_a_read_only_cache_fails_before_compiling_and_still_serves_loads(model, cached, read_only, tmp_path,
                                                                          caplog):
    empty = tmp_path / "read-only-cache"
    (empty / "artifacts").mkdir(parents=True)
    read_only(empty / "artifacts")
    caplog.set_level("INFO")
    with pytest.raises(ArtifactError) as error:
        compile_model(model, cache_dir=empty)
    message = str(error.value)
    assert "\n" not in message and f"the compile cache {empty / 'artifacts'} is not writable" in message
    assert "EMBER_CACHE" in message and "compiled LlamaForCausalLM" not in caplog.text  # refused before compiling

    read_only(cached.parent)  # holds the artifact already: loads need no writing
    assert not compile_model(model, cache_dir=cached.parent.parent).compiled
    with pytest.raises(ArtifactError, match="is not writable"):
        compile_model(model, cache_dir=cached.parent.parent, force=True)
