"""``python -m ember.tools.gpu_check`` (issue 12): here, without an NVIDIA GPU, it exits 2 with one line per missing
prerequisite, "no NVIDIA GPU" among them; ``--help`` works; its table and prerequisite logic are checked with probes
in place of the machine."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ember.tools.gpu_check import (
    CHECKS,
    EXIT_PREREQUISITES,
    Check,
    Result,
    format_table,
    main,
    prerequisites,
)


def _has_gpu() -> bool:
    from ember.compiler.cuda_device import CudaUnavailable, probe_cuda_device

    try:
        probe_cuda_device(0)
    except CudaUnavailable:
        return False
    return True


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.tools.gpu_check", *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.skipif(_has_gpu(), reason="an NVIDIA GPU is here: the check would run")
def test_without_a_gpu_it_exits_2_naming_what_is_missing():
    done = _run()
    assert done.returncode == EXIT_PREREQUISITES, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("gpu_check: no NVIDIA GPU: ")
    assert all(line.startswith("gpu_check: ") for line in lines) and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_help_and_bad_options():
    done = _run("--help")
    assert done.returncode == 0 and "--target" in done.stdout and "--json" in done.stdout
    done = _run("--device", "cpu")
    assert done.returncode == 2 and "runs on a CUDA device" in done.stderr
    done = _run("--target", "ort-cpu")
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_prerequisites_are_asked_for_the_targets_checked():
    asked = []

    def probe(name, answer=None):
        def run():
            asked.append(name)
            return answer
        return run

    names = ("gpu", "cuda-python", "ort-cuda", "tensorrt", "target tensorrt", "target ort-cuda", "reference")
    probes = {name: probe(name) for name in names}
    assert prerequisites(("ort-cuda",), probes=probes) == []
    assert asked == ["gpu", "cuda-python", "ort-cuda", "target ort-cuda", "reference"]
    probes["tensorrt"] = probe("tensorrt", "tensorrt is not importable: not installed")
    probes["gpu"] = probe("gpu", "no NVIDIA GPU: the CUDA driver sees no device")
    assert prerequisites(("tensorrt", "ort-cuda"), probes=probes) == [
        "no NVIDIA GPU: the CUDA driver sees no device", "tensorrt is not importable: not installed"]


def test_main_stops_before_any_check_when_something_is_missing(monkeypatch, capsys):
    from ember.tools import gpu_check

    monkeypatch.setattr(gpu_check, "prerequisites", lambda targets, index: ["no NVIDIA GPU: none here"])
    monkeypatch.setattr(gpu_check, "run_check", lambda *a: pytest.fail("a check ran without its prerequisites"))
    assert main(["--target", "tensorrt", "--device", "cuda:1"]) == EXIT_PREREQUISITES
    assert capsys.readouterr().err == "gpu_check: no NVIDIA GPU: none here\n"


def test_the_table_and_json_say_what_passed(monkeypatch, capsys):
    from ember.tools import gpu_check

    def fake_check(check, device):  # the machine's part replaced; the table and exit status are what is tested
        result = Result(check, accuracy="top-1 99.5 %", metrics={"ttft_s_b1": 0.012, "decode_tok_s_b1": 310.0})
        if check.encoding == "q4_0":
            result.failures.append("top-1 agreement 80.0 % < 85 %")
        return result

    monkeypatch.setattr(gpu_check, "prerequisites", lambda targets, index: [])
    monkeypatch.setattr(gpu_check, "run_check", fake_check)
    assert main(["--target", "ort-cuda"]) == 0
    table = capsys.readouterr().out
    assert "ort-cuda  smollm2" in table and "12.0" in table and "310.0" in table and table.rstrip().endswith("PASS")
    assert main(["--target", "tensorrt", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["encoding"], r["passed"]) for r in rows] == [
        ("smollm2", "float16", True), ("smollm2", "q4_0", False), ("all-minilm-l6-v2", "float16", True)]
    assert {c.target for c in CHECKS} == {"tensorrt", "ort-cuda"}
    assert "FAIL: boom" in format_table([Result(Check("tensorrt", "smollm2", "q4_0"), failures=["boom"])])
