"""``--kv-cache-bit-width`` on the command line (real subprocesses, a tiny random Llama): compile writes an int8
KV cache artifact that generate runs; unsupported widths and models are clean errors."""
from __future__ import annotations

import json
import os

import pytest

from ..reference.tiny_models import make_model
from .test_cli import assert_clean_error, ember


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama-gqa-llama3", model)
    return model, {**os.environ, "EMBER_CACHE": str(tmp_path_factory.mktemp("ember-cache"))}


def test_compile_and_generate_with_an_int8_kv_cache(setup, tmp_path):
    model, env = setup
    result = ember("compile", str(model), "--kv-cache-bit-width", "8", "-o", str(tmp_path / "artifact"), env=env)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["kv_params"]["dtype"] == "int8" and manifest["options"]["kv_cache_bit_width"] == 8
    result = ember("generate", "w5 w6 w7", "--model", str(tmp_path / "artifact"), "--max-new-tokens", "4",
                   "--no-chat-template", "--ignore-eos", env=env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 4


def test_unsupported_widths_and_models_are_clean_errors(setup):
    model, env = setup
    result = ember("generate", "w5", "--model", str(model), "--kv-cache-bit-width", "4", env=env)
    assert_clean_error(result, 1)
    assert "supported kv_cache_bit_width: 0, 8" in result.stderr
    assert_clean_error(ember("bench", "--embeddings", "--kv-cache-bit-width", "8", env=env), 2)
    assert "--kv-cache-bit-width" in ember("bench", "--help").stdout
