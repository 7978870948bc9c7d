"""Hostile model files through the real ``ember`` command (a subprocess, as a user runs it): one
``ember: error: ...`` line naming the file, exit 1, no traceback, nothing run (ember issue 17). The files are
crafted here; the per-field cases are in tests/graphs/test_hostile_files.py and tests/runtime/test_tokenizer_safety.py.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from ..graphs.test_hostile_files import write_gguf, write_tiny_llama
from ..runtime.test_tokenizer_safety import folder_with_own_code


def ember(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.tools", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300)


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {**os.environ, "EMBER_CACHE": str(tmp_path / "cache")}


def assert_one_line_error(result: subprocess.CompletedProcess, starts: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ember: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"ember: error: {starts}"), result.stderr
    return errors[0]


@pytest.mark.parametrize("damage, match", [
    ("truncate", "data section, which has only"),
    ("header length", "safetensors header length 4611686018427387904 runs past the end of the file")])
def test_broken_safetensors(tmp_path, env, damage, match):
    model = write_tiny_llama(tmp_path / "model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-8] if damage == "truncate" else struct.pack("<Q", 2 ** 62) + data[8:])
    line = assert_one_line_error(ember("compile", str(model), env=env), f"{weights}: ")
    assert match in line
    assert not (tmp_path / "cache" / "artifacts").exists() or not any((tmp_path / "cache" / "artifacts").iterdir())


def test_gguf_missing_key(tmp_path, env):
    path = write_gguf(tmp_path / "model.gguf", drop=("llama.embedding_length",))
    line = assert_one_line_error(ember("compile", str(path), env=env), "")
    assert "GGUF metadata llama.embedding_length is missing" in line


def test_tokenizer_code_never_runs_even_answering_yes(tmp_path, env):
    """stdin is a pipe that answers 'y': transformers would ask whether to run the folder's code and read it."""
    model, marker = folder_with_own_code(tmp_path, tokenizer_class=None)
    result = ember("generate", "--model", str(model), "--max-new-tokens", "1", "w5", env=env, stdin="y\ny\n")
    line = assert_one_line_error(result, f"{model / 'tokenizer_config.json'}: auto_map points the tokenizer")
    assert "trust_remote_code=False" in line
    assert not marker.exists(), "the model folder's Python ran"
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    assert json.loads((model / "tokenizer_config.json").read_text())["auto_map"]  # the crafted file is as written


def _no_artifact(tmp_path) -> bool:
    artifacts = tmp_path / "cache" / "artifacts"
    return not artifacts.exists() or not any(p for p in artifacts.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("damage, starts, match", [
    ("not json", "config.json", "is not valid JSON"),
    ("architectures a string", "config.json", "architectures must be a list of class names"),
    ("no num_attention_heads", "config.json", "num_attention_heads is missing"),
    ("more layers than the checkpoint", "", "num_hidden_layers is 9 but the checkpoint has layers 0..1"),
    ("no tokenizer", "", "tokenizer"),
])
def test_a_broken_model_folder_fails_before_compiling(tmp_path, env, damage, starts, match):
    """config.json is checked by its architecture's spec before transformers fills in defaults, the checkpoint
    against the config and the tokenizer before the graph is built: one line naming the problem, nothing in the
    cache."""
    from ..graphs.test_hostile_files import CONFIG

    model = write_tiny_llama(tmp_path / "model")
    config_file = model / "config.json"
    if damage == "not json":
        config_file.write_text('{"architectures": ["LlamaForCausalLM"],')
    elif damage == "architectures a string":
        config_file.write_text(json.dumps({**CONFIG, "architectures": "LlamaForCausalLM"}))
    elif damage == "no num_attention_heads":
        config_file.write_text(json.dumps({k: v for k, v in CONFIG.items() if k != "num_attention_heads"}))
    elif damage == "more layers than the checkpoint":
        config_file.write_text(json.dumps({**CONFIG, "num_hidden_layers": 9}))
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model / name).unlink()
    line = assert_one_line_error(ember("compile", str(model), env=env),
                                 f"{config_file}" if starts == "config.json" else starts)
    assert match in line, line
    assert _no_artifact(tmp_path)
