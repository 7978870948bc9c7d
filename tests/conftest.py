"""Shared fixtures. Every test compiles into its own cache folder (never the user's ~/.cache/ember).

The default models are the exception: tests that point ``EMBER_CACHE`` at a folder of their own still share
one model store (``EMBER_MODELS``, the session's), so the models are fetched once, not once per test module.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

from ember.runtime.pipelines.model_store import models_dir


def pytest_configure(config):
    os.environ["EMBER_MODELS"] = str(models_dir())


@pytest.fixture
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ember-cache")


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


_TORCH_DISTRIBUTIONS = ("torch", "functorch", "torchgen", "triton", "nvidia")


def run_without_torch(code: str, directory, env: dict[str, str], timeout: float = 120):
    """Run ``code`` in this interpreter as a deployment runs it: on this environment's packages without torch.

    ``directory`` gets a symlink to every entry of site-packages except torch and its kin (modules and
    dist-info alike), and Python starts without its own site (``-S``) on that folder, so ``import torch`` fails
    and ``find_spec("torch")`` is None, as where torch was never installed (transformers then keeps it away)."""
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    site_packages = Path(sysconfig.get_paths()["purelib"])
    for entry in site_packages.iterdir():
        if not entry.name.lower().startswith(_TORCH_DISTRIBUTIONS):
            (Path(directory) / entry.name).symlink_to(entry)
    prelude = f"import site; site.addsitedir({str(directory)!r})\n"
    return subprocess.run([sys.executable, "-S", "-c", prelude + code], capture_output=True, text=True, env=env,
                          timeout=timeout)
