"""``ember generate --speculative ...`` and ``ember bench --speculative`` as real subprocesses on a tiny random
Llama: the same greedy text as plain decoding; bad combinations are one-line errors."""
from __future__ import annotations

import json

import pytest

from .test_cli import assert_clean_error, ember, env, tiny_llama  # noqa: F401 (fixtures)


def test_generate_speculative_ngram_and_draft_give_the_plain_text(tiny_llama, env):  # noqa: F811
    args = ("generate", "--model", str(tiny_llama), "hello", "--no-chat-template", "--ignore-eos",
            "--max-new-tokens", "30", "--kv-cache-strategy", "paged")
    plain = ember(*args, env=env)
    assert plain.returncode == 0, plain.stderr
    for option in (("--speculative", "ngram", "--num-speculative-tokens", "3"), ("--draft-model", str(tiny_llama))):
        speculative = ember(*args, *option, env=env)
        assert speculative.returncode == 0, speculative.stderr
        assert speculative.stdout == plain.stdout, option


@pytest.mark.parametrize("option, code, message", [
    (("--speculative", "ngram", "--kv-cache-strategy", "continuous"), 1, "kv_cache_strategy='paged'"),
    (("--speculative", "draft"), 1, "draft_model_path"),
    (("--num-speculative-tokens", "3"), 2, "--num-speculative-tokens needs --speculative"),
    (("--speculative", "ngram", "--num-speculative-tokens", "0"), 2, "positive"),
])
def test_bad_speculative_options_are_clean_errors(tiny_llama, env, option, code, message):  # noqa: F811
    result = ember("generate", "--model", str(tiny_llama), "hello", "--max-new-tokens", "2", *option, env=env)
    assert_clean_error(result, code)
    assert message in result.stderr


def test_bench_speculative_reports_both_sets_with_identical_output(tiny_llama, env, tmp_path):  # noqa: F811
    out = tmp_path / "spec.json"
    result = ember("bench", str(tiny_llama), "--speculative", "ngram", "--runs", "1", "--warmup", "0",
                   "--new-tokens", "8", "--compare", "hf", "--json", str(out), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["sets"]) == {"grounded", "free"}
    assert all(row["identical_output"] for row in report["sets"].values())
    assert report["step_costs"]["verify_over_decode"] > 0
    assert report["peer"] == "hf" and all(row["peer_tok_s"]["median"] > 0 and row["ratio_to_peer"] > 0
                                          for row in report["sets"].values())
    assert "grounded" in result.stdout and "step cost" in result.stdout and "hf " in result.stdout
