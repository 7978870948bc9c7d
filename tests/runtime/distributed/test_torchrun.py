"""The multi-host launch, on one host: ``torchrun ... -m ember.tools generate ... --tensor-parallel 2`` (every rank runs
the command; rank 0 runs it, the others follow) prints what the single-process command prints."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch.distributed", reason="tensor parallelism runs over torch.distributed (the test extra)")

from tests.reference.tiny_models import make_model  # noqa: E402


def test_torchrun_ranks_generate_what_one_process_does(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    make_model("llama-gqa-llama3", tmp_path / "model")
    env = {**os.environ, "EMBER_CACHE": str(tmp_path / "cache")}
    command = ["generate", "--model", str(tmp_path / "model"), "w5 w6 w7 w8", "--max-new-tokens", "12",
               "--no-chat-template"]
    single = subprocess.run([sys.executable, "-m", "ember.tools", *command], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    split = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "ember.tools", *command,
                            "--tensor-parallel", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == single.stdout and split.stdout.strip()
