"""All of ember is type-checked with mypy: an attribute its class does not have, an optional value used as present, a
call with the wrong arguments is caught here, not in a user's server. It began with the code that cannot run without
GPUs (the CUDA backends, NCCL collectives on device buffers, the rank machinery they share with the CPU path, the
TensorRT target's graph rewrites), where no test would catch it; the rest followed.

ember's package folders are mapped onto ``ember.*`` by setup.py (no ``ember/`` folder on disk), so the check runs on
a folder of links that has that layout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="the type check needs mypy (the test extra)")

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ["ember/graphs", "ember/compiler", "ember/runtime", "ember/tools"]


def test_the_code_type_checks(tmp_path):
    package = tmp_path / "ember"
    package.mkdir()
    for folder in ("graphs", "compiler", "runtime", "tools"):
        (package / folder).symlink_to(ROOT / folder, target_is_directory=True)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--namespace-packages", "--explicit-package-bases",
         "--follow-imports=silent", "--no-incremental", "--cache-dir", str(tmp_path / ".mypy_cache"), *CHECKED],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
