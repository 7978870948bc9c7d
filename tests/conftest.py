"""Shared fixtures. Every test compiles into its own cache folder (never the user's ~/.cache/ember)."""
from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ember-cache")


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
