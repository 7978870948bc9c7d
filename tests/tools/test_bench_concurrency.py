"""``ember bench --concurrency`` as a real subprocess on a tiny random Llama: requests through the engine at each
level, and with ``--compare`` the peer's static batch in the same run (transformers here; onnxruntime-genai in the
benchmark itself), each level's ratio to it; ``--compare`` with ``--prefix-cache`` is a usage error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .test_cli import assert_clean_error, ember, env, tiny_llama  # noqa: F401 (fixtures)


def test_concurrency_levels_against_a_static_batch_peer(tiny_llama, env, tmp_path):  # noqa: F811
    out = tmp_path / "concurrency.json"
    result = ember("bench", str(tiny_llama), "--concurrency", "1,2", "--compare", "hf", "--batch-size", "2",
                   "--runs", "2", "--prompt-tokens", "8", "--new-tokens", "4", "--json", str(out), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())["concurrency"]
    assert sorted(report["levels"]) == ["1", "2"]
    peer = report["peer"]
    assert peer["name"] == "hf" and peer["batch_size"] == 2
    assert 0 < peer["output_tok_s_min"] <= peer["output_tok_s"] <= peer["output_tok_s_max"]
    for row in report["levels"].values():
        assert row["output_tok_s"] > 0
        assert abs(row["ratio_to_peer"] - row["output_tok_s"] / peer["output_tok_s"]) < 1e-9
    assert "hf static batch 2" in result.stdout


def test_compare_with_prefix_cache_is_a_usage_error(tiny_llama, env):  # noqa: F811
    result = ember("bench", str(tiny_llama), "--prefix-cache", "--compare", "hf", env=env)
    assert_clean_error(result, 2)
    assert "--compare applies to --concurrency" in result.stderr


def test_decode_slots_against_the_continuous_static_batch(tiny_llama, env, tmp_path):  # noqa: F811
    """Issue 15's concurrency-1 goal in one run: the paged engine with a decode slot against ember's own continuous
    static batch 1, the report naming the peer and the engine's strategy."""
    out = tmp_path / "slots.json"
    result = ember("bench", str(tiny_llama), "--concurrency", "1", "--decode-slots", "1", "--compare", "continuous",
                   "--batch-size", "1", "--runs", "2", "--prompt-tokens", "8", "--new-tokens", "4", "--json", str(out),
                   env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["kv_cache_strategy"] == "paged" and report["decode_slots"] == 1
    assert "paged KV cache with 1 decode slot," in result.stdout
    peer = report["concurrency"]["peer"]
    assert peer["name"].endswith("continuous") and peer["batch_size"] == 1
    assert report["concurrency"]["levels"]["1"]["ratio_to_peer"] > 0
    assert "continuous static batch 1" in result.stdout


def test_compare_continuous_needs_concurrency(tiny_llama, env):  # noqa: F811
    result = ember("bench", str(tiny_llama), "--compare", "continuous", env=env)
    assert_clean_error(result, 2)
    assert "--compare continuous measures the engine" in result.stderr


def test_decode_slots_with_speculative_decoding_is_refused(tiny_llama, env):  # noqa: F811
    result = ember("bench", str(tiny_llama), "--speculative", "ngram", "--decode-slots", "1", env=env)
    assert_clean_error(result, 2)
    assert "--decode-slots is for plain decoding" in result.stderr


def test_the_engine_takes_a_decode_slot_by_default_and_reports_it(tiny_llama, env, tmp_path):  # noqa: F811
    out = tmp_path / "default.json"
    result = ember("bench", str(tiny_llama), "--concurrency", "1", "--runs", "1", "--prompt-tokens", "8",
                   "--new-tokens", "4", "--json", str(out), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["decode_slots"] == 1
    assert "paged KV cache with 1 decode slot" in result.stdout


def test_compile_holds_the_slots_graph_in_a_paged_artifact_unless_told_not_to(tiny_llama, env):  # noqa: F811
    manifests = {}
    for flags in (["--kv-cache-strategy", "paged"], ["--kv-cache-strategy", "paged", "--decode-slots", "0"],
                  ["--kv-cache-strategy", "continuous"]):
        result = ember("compile", str(tiny_llama), *flags, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        path = result.stdout.strip().splitlines()[-1]
        manifests[" ".join(flags)] = json.loads((Path(path) / "manifest.json").read_text())
    assert [("slot_graph" in m) for m in manifests.values()] == [True, False, False]


def test_arrivals_are_a_seeded_poisson_process():
    from ember.tools.bench_serving import arrival_offsets

    assert arrival_offsets(4, None) == [0.0] * 4
    offsets = arrival_offsets(4000, 20.0)
    assert offsets[0] == 0.0 and offsets == sorted(offsets) and offsets == arrival_offsets(4000, 20.0)
    gaps = np.diff(offsets)
    assert abs(gaps.mean() - 1 / 20) < 0.005  # exponential gaps of mean 1/rate (std of the mean: 0.0008)
    assert abs(gaps.std() - 1 / 20) < 0.005  # an exponential's deviation equals its mean: not a fixed interval


def test_requests_arrive_at_the_rate_asked(tiny_llama, env, tmp_path):  # noqa: F811
    out = tmp_path / "rate.json"
    result = ember("bench", str(tiny_llama), "--concurrency", "4", "--request-rate", "10", "--runs", "1",
                   "--prompt-tokens", "8", "--new-tokens", "4", "--json", str(out), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())["concurrency"]
    assert report["request_rate"] == 10
    from ember.tools.bench_serving import arrival_offsets

    sample = report["levels"]["4"]["samples"][0]
    assert sample["requests"] == 4 and sample["wall_s"] >= arrival_offsets(4, 10.0)[-1]
    assert "arriving at 10 requests/s (Poisson, seeded)" in result.stdout
    result = ember("bench", str(tiny_llama), "--request-rate", "10", env=env)
    assert_clean_error(result, 2)
    assert "--request-rate applies to --concurrency" in result.stderr
