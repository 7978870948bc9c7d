"""The ``ember`` command line, run as a real subprocess on a tiny random Llama (no mocks)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import run_without_torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def ember(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.tools", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess, code: int) -> None:
    assert result.returncode == code, result.stderr
    assert "ember: error:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return {**os.environ, "EMBER_CACHE": str(tmp_path_factory.mktemp("ember-cache"))}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama with a word-level tokenizer over the benchmark text's words."""
    pytest.importorskip("torch")
    from ..reference.tiny_models import make_word_llama

    directory = tmp_path_factory.mktemp("tiny-llama")
    model, _ = make_word_llama(directory, (TOOLS / "bench_text.txt").read_text(), extra_words=("hello",))
    model.save_pretrained(directory)
    return directory


def test_version_and_help():
    result = ember("--version")
    assert result.returncode == 0 and result.stdout.startswith("ember ")
    for command in ("list", "compile", "generate", "chat", "bench"):
        result = ember(command, "--help")
        assert result.returncode == 0, result.stderr
        assert f"usage: ember {command}" in result.stdout


def test_list_names_the_architectures():
    result = ember("list")
    assert result.returncode == 0, result.stderr
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert name in result.stdout
    assert "float32" in result.stdout and "continuous" in result.stdout
    listed = json.loads(ember("list", "--json").stdout)
    assert {r["name"] for r in listed["architectures"]} >= {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
    from ember.compiler.targets import TARGETS

    targets = {t["name"]: t for t in listed["targets"]}
    assert set(targets) == set(TARGETS)  # every target, with what it compiles
    for name, target in TARGETS.items():
        assert targets[name]["encodings"] == list(target.encodings)
        assert targets[name]["kv_cache_strategies"] == [s.value for s in target.kv_strategies]
        assert targets[name]["device_kind"] == target.device_kind
        assert name in result.stdout and ", ".join(target.encodings) in result.stdout


def test_usage_errors_exit_2(tmp_path):
    assert_clean_error(ember("no-such-command"), 2)
    assert_clean_error(ember("generate", "hi", "--max-new-tokens", "0"), 2)
    # sampling values out of range are usage errors, reported before any model loads
    for command, option, value, message in (
            (("generate", "hi"), "--repetition-penalty", "0", "repetition_penalty must be > 0"),
            (("generate", "hi"), "--frequency-penalty", "2.5", "frequency_penalty must be in [-2, 2]"),
            (("chat",), "--presence-penalty", "-3", "presence_penalty must be in [-2, 2]")):
        result = ember(*command, option, value)
        assert_clean_error(result, 2)
        assert message in result.stderr
    assert_clean_error(ember("compile", str(tmp_path), "--encoding", "float64"), 2)
    result = ember()
    assert result.returncode == 2 and "usage: ember" in result.stderr


def test_bad_model_paths_exit_1(tmp_path, env):
    result = ember("generate", "--model", str(tmp_path / "missing"), "hi", env=env)
    assert_clean_error(result, 1)
    assert "model not found" in result.stderr
    (tmp_path / "notes.txt").write_text("not a model")
    result = ember("compile", str(tmp_path / "notes.txt"), env=env)
    assert_clean_error(result, 1)
    assert "not a model" in result.stderr


def test_unsupported_architecture_exits_1(tmp_path, env):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    result = ember("compile", str(tmp_path), env=env)
    assert_clean_error(result, 1)
    assert "GPT2LMHeadModel" in result.stderr and "LlamaForCausalLM" in result.stderr


def test_compile_to_output_dir(tiny_llama, tmp_path, env):
    out = tmp_path / "artifact"
    result = ember("compile", str(tiny_llama), "-o", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == out.resolve()
    assert re.search(r"compiled LlamaForCausalLM for ort-cpu in [\d.]+ s", result.stderr)
    assert (out / "manifest.json").is_file() and (out / "tokenizer").is_dir()
    assert (out / "rank0" / "model.onnx").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"] == "LlamaForCausalLM"
    # An existing artifact is replaced only with --force; the artifact itself is not a compile source.
    assert_clean_error(ember("compile", str(tiny_llama), "-o", str(out), env=env), 1)
    assert_clean_error(ember("compile", str(out), env=env), 1)


def test_generate_compiles_then_loads_from_cache(tiny_llama, env):
    args = ("generate", "--model", str(tiny_llama), "hello", "--max-new-tokens", "5", "--no-chat-template")
    first = ember(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "compiled in" in first.stderr
    second = ember(*args, env=env)
    assert second.returncode == 0, second.stderr
    assert "loaded cached artifact in" in second.stderr
    assert re.search(r"prompt 1 tokens, generated [1-5] tokens", second.stderr)
    assert second.stdout == first.stdout  # greedy: the same text both times


def test_generate_does_not_import_torch(tiny_llama, env, tmp_path):
    """Deployments have no torch (only ``bench --compare hf`` needs it): the command runs where torch is not installed."""
    code = ("import sys; from ember.tools.cli import main; assert main(['list']) == 0; "
            f"assert main(['generate', '--model', {str(tiny_llama)!r}, 'hello', '--max-new-tokens', '2', "
            "'--no-chat-template']) == 0; assert 'torch' not in sys.modules, 'torch imported'")
    result = run_without_torch(code, tmp_path, env)
    assert result.returncode == 0, result.stderr


def test_bench_prints_metrics(tiny_llama, env, tmp_path):
    report_path = tmp_path / "bench.json"
    result = ember("bench", str(tiny_llama), "--runs", "1", "--new-tokens", "8", "--prompt-tokens", "8",
                   "--json", str(report_path), env=env)
    assert result.returncode == 0, result.stderr
    for text in ("TTFT (ms)", "decode (tok/s)", "peak RSS", "prompt 8 tokens", "8 new tokens"):
        assert text in result.stdout
    report = json.loads(report_path.read_text())
    assert report["ember"]["generated_tokens"] == [8]
    assert report["ember"]["decode_tok_s"]["median"] > 0
    assert report["memory"]["ember"]["peak_rss_mib"] > 0


def test_generate_streams_tokens_through_a_pipe_as_they_are_made(tiny_llama, env):
    """stdout is a pipe (block-buffered by Python): the text must still arrive piece by piece, each delta
    flushed as its token is made, not in one block at the end. Also the default length: 128 new tokens."""
    import select
    import time

    args = [sys.executable, "-m", "ember.tools", "generate", "--model", str(tiny_llama), "hello",
            "--no-chat-template", "--ignore-eos"]
    ember(*args[3:], env=env)  # compile first, so that the streamed run below is only loading and decoding
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    chunks: list[bytes] = []
    stderr = b""
    streams = {process.stdout.fileno(): "out", process.stderr.fileno(): "err"}
    deadline = time.monotonic() + 120
    while streams and time.monotonic() < deadline:
        ready, _, _ = select.select(list(streams), [], [], 1.0)
        for fd in ready:
            data = os.read(fd, 65536)
            if not data:
                del streams[fd]
            elif streams[fd] == "out":
                chunks.append(data)
            else:
                stderr += data
    assert process.wait(timeout=60) == 0, stderr.decode()
    text = b"".join(chunks).decode("utf-8")
    assert len(text.split()) > 10
    assert len(chunks) >= 4, f"stdout came in {len(chunks)} piece(s): not streamed"
    assert re.search(r"generated 128 tokens \(length\).*stopped at --max-new-tokens 128", stderr.decode())


def test_generate_penalties_change_a_repetitive_greedy_answer(tiny_llama, env):
    args = ("generate", "--model", str(tiny_llama), "hello", "--no-chat-template", "--ignore-eos",
            "--max-new-tokens", "40")
    plain = ember(*args, env=env)
    assert plain.returncode == 0, plain.stderr
    words = plain.stdout.split()
    assert len(set(words)) < len(words), "the random model's greedy answer repeats itself"
    for option in (("--repetition-penalty", "1.5"), ("--presence-penalty", "1.5"), ("--frequency-penalty", "1")):
        penalized = ember(*args, *option, env=env)
        assert penalized.returncode == 0, penalized.stderr
        assert penalized.stdout != plain.stdout, option
        penalized_words = penalized.stdout.split()
        assert len(set(penalized_words)) > len(set(words)), option  # fewer repeats: more distinct words


@pytest.mark.parametrize("target,encoding,backend,hint", [
    ("tensorrt", "float16", "tensorrt", "pip install 'ember[tensorrt]'"),
    ("ort-cuda", "bfloat16", "onnxruntime-cuda", "pip install 'ember[cuda]'")])
def test_gpu_targets_compile_here_and_refuse_to_run_without_a_gpu(tiny_llama, tmp_path, env, target, encoding,
                                                                  backend, hint):
    """Both GPU targets compile on this machine (their graphs pass their checks at compile time); the manifest says
    cuda; running the artifact without the GPU packages is one line naming what to install, not a traceback."""
    out = tmp_path / target
    result = ember("compile", str(tiny_llama), "--target", target, "--encoding", encoding, "--device", "cuda:1",
                   "-o", str(out), env=env)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["devices"] == ["cuda"] and manifest["runtime"]["device_kind"] == "cuda"
    assert manifest["runtime"]["backend"] == backend and manifest["kv_params"]["dtype"] == encoding
    if target == "tensorrt":  # no GPU here: the engine is left to the first load on one, and the user is told
        assert "no TensorRT engine built for cuda:1" in result.stderr and "the first load on a GPU builds" in result.stderr
    run = ember("generate", "--model", str(out), "--max-new-tokens", "2", "hi", env=env)
    assert_clean_error(run, 1)
    wrong = ember("compile", str(tiny_llama), "--target", target, "--device", "cpu", "-o", str(tmp_path / "x"), env=env)
    assert_clean_error(wrong, 1)
    assert f"--device cpu: target {target} compiles for cuda devices" in wrong.stderr
    assert f"the {backend} backend needs" in run.stderr and hint in run.stderr
