"""``python -m ember.tools.gpu_check``: the end-to-end check a person with an NVIDIA GPU runs (issue 12).

It installs nothing. First the prerequisites, each missing one a line, exit status 2: an NVIDIA GPU and its
driver, cuda-python, onnxruntime-gpu's CUDA provider (target ``ort-cuda``), TensorRT (target ``tensorrt``), the
targets in this ember, and transformers + torch (+ gguf, sentence-transformers) for the references. Then, per
check (:data:`CHECKS`), on ``--device``:

* SmolLM2 (the packaged GGUF, ``ember generate``'s default model) compiled for the target and encoding, compared
  with transformers by ``ember verify`` (teacher-forced top-1 agreement over the shipped text's positions; float16
  must agree on at least 99 %, q4_0 must pass ``ember verify``'s q4_0 thresholds), then timed by ``ember bench``'s
  code: TTFT and decode tokens/s at batch 1 and 8, and output tokens/s of 16 concurrent requests;
* all-MiniLM-L6-v2 for TensorRT, compared with sentence-transformers (cosine of every sentence's embedding at
  least 0.999) and timed (sentences/s), by ``ember bench --embeddings``' code.

It prints a table (``--json``: the same rows as JSON) and exits 0 only if every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

EXIT_PASS, EXIT_FAIL, EXIT_PREREQUISITES = 0, 1, 2
TARGETS = ("tensorrt", "ort-cuda")
MIN_TOP1 = 0.99  # float16 against transformers, teacher-forced positions
MIN_COSINE = 0.999  # embeddings against sentence-transformers
PROMPT_TOKENS, NEW_TOKENS, BATCHES, CONCURRENCY = 64, 64, (1, 8), 16


@dataclass(frozen=True)
class Check:
    """One model compiled for one target and encoding."""

    target: str
    model: str  # "smollm2" | "all-minilm-l6-v2"
    encoding: str

    @property
    def embeddings(self) -> bool:
        return self.model == "all-minilm-l6-v2"


CHECKS = (Check("tensorrt", "smollm2", "float16"), Check("tensorrt", "smollm2", "q4_0"),
          Check("ort-cuda", "smollm2", "float16"), Check("tensorrt", "all-minilm-l6-v2", "float16"))


@dataclass
class Result:
    """What one check measured, and whether it passed."""

    check: Check
    accuracy: str = ""  # "top-1 99.6 %" / "min cosine 0.9996"
    metrics: dict[str, float | None] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.check), "accuracy": self.accuracy, "metrics": self.metrics, "failures": self.failures,
                "passed": self.passed, "seconds": self.seconds}


# prerequisites ---------------------------------------------------------------------------------------------------
def _gpu(device_index: int) -> str | None:
    from ember.compiler.cuda_device import CudaUnavailable, probe_cuda_device

    try:
        probe_cuda_device(device_index)
    except CudaUnavailable as error:
        return f"no NVIDIA GPU: {error}"
    return None


def _module(name: str, what: str) -> str | None:
    return None if importlib.util.find_spec(name) is not None else f"{what} is not installed"


def _cuda_python() -> str | None:
    if importlib.util.find_spec("cuda") is None or (importlib.util.find_spec("cuda.bindings") is None
                                                    and importlib.util.find_spec("cuda.cudart") is None):
        return "cuda-python is not installed (pip install 'ember[cuda]')"
    return None


def _ort_cuda() -> str | None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return (f"onnxruntime-gpu's CUDA provider is not available: onnxruntime {onnxruntime.__version__} has "
                f"{', '.join(onnxruntime.get_available_providers())} (pip install 'ember[cuda]')")
    return None


def _tensorrt() -> str | None:
    from ember.compiler.tensorrt_engine import TensorRTUnavailable, tensorrt_version

    try:
        tensorrt_version()
    except TensorRTUnavailable as error:
        return f"tensorrt is not importable: {error}"
    return None


def _target(name: str) -> str | None:
    from ember.compiler.targets import TARGETS as REGISTERED

    return None if name in REGISTERED else f"target {name} is not in this ember (targets: {', '.join(REGISTERED)})"


def prerequisites(targets: Sequence[str], device_index: int = 0,
                  probes: dict[str, Callable[[], str | None]] | None = None) -> list[str]:
    """One line per missing prerequisite of checking ``targets`` on ``cuda:device_index`` (empty: all there).
    ``probes`` replaces the named probes (tests)."""
    table: dict[str, Callable[[], str | None]] = {
        "gpu": lambda: _gpu(device_index),
        "cuda-python": _cuda_python,
        "ort-cuda": _ort_cuda,
        "tensorrt": _tensorrt,
        "target tensorrt": lambda: _target("tensorrt"),
        "target ort-cuda": lambda: _target("ort-cuda"),
        "reference": lambda: "; ".join(filter(None, (
            _module("torch", "torch (the transformers reference)"),
            _module("transformers", "transformers (the reference)"),
            _module("gguf", "gguf (transformers reads SmolLM2's GGUF with it)"),
            _module("sentence_transformers", "sentence-transformers (the embeddings reference)")))) or None,
        **(probes or {})}
    wanted = ["gpu", "cuda-python", *(name for name in ("ort-cuda", "tensorrt") if name in targets),
              *(f"target {name}" for name in targets), "reference"]
    return [line for line in (table[name]() for name in wanted) if line]


# checks --------------------------------------------------------------------------------------------------------------
def _decoder(check: Check, device: str, result: Result) -> None:
    from .bench import run_benchmark
    from .bench_serving import run_concurrency_benchmark
    from .loading import load_pipeline, pipeline_config
    from .verify import VerifyOptions, verify_model

    report = verify_model(VerifyOptions(model=None, encoding=check.encoding, target=check.target, device=device,
                                        reference="transformers"))
    top1 = report.agreement.top1
    result.accuracy = f"top-1 {100 * top1:.1f} % ({report.agreement.tokens} positions)"
    result.metrics["top1"] = top1
    if check.encoding == "float16" and top1 < MIN_TOP1:
        result.failures.append(f"top-1 agreement {100 * top1:.1f} % < {100 * MIN_TOP1:.0f} %")
    elif check.encoding != "float16":
        result.failures.extend(report.failures)
    loaded = load_pipeline(pipeline_config(None, encoding=check.encoding, target=check.target, device=device,
                                           max_batch_size=CONCURRENCY, max_length=PROMPT_TOKENS + NEW_TOKENS + 8))
    for batch in BATCHES:
        bench = run_benchmark(loaded, prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS, batch_size=batch, runs=3,
                              warmup=1, progress=False)
        result.metrics[f"ttft_s_b{batch}"] = bench["ember"]["ttft_s"]["median"]
        result.metrics[f"decode_tok_s_b{batch}"] = bench["ember"]["decode_tok_s"]["median"]
    serving = run_concurrency_benchmark(loaded.pipeline, loaded.tokenizer, [CONCURRENCY], prompt_tokens=PROMPT_TOKENS,
                                        new_tokens=NEW_TOKENS, runs=1)
    result.metrics[f"concurrency{CONCURRENCY}_tok_s"] = serving["levels"][CONCURRENCY]["output_tok_s"]


def _embeddings(check: Check, device: str, result: Result) -> None:
    from ember.runtime.pipelines import PipelineTask

    from .bench_embeddings import run_embeddings_benchmark
    from .bench_st import STRunner
    from .loading import embeddings_model, load_pipeline, pipeline_config

    model = embeddings_model(None)
    loaded = load_pipeline(pipeline_config(model, encoding=check.encoding, target=check.target, device=device,
                                           max_batch_size=32), PipelineTask.EMBEDDINGS_GENERATION)
    report = run_embeddings_benchmark(loaded, sentences=256, runs=1, warmup=1, progress=False,
                                      peer_factory=lambda: STRunner(model, loaded.num_threads))
    cosine = report["agreement"]["min_cosine"]
    result.accuracy = f"min cosine {cosine:.5f} ({report['agreement']['of']} sentences)"
    result.metrics["min_cosine"] = cosine
    result.metrics["sentences_per_s"] = report["ember"]["sentences_per_s"]["median"]
    if cosine < MIN_COSINE:
        result.failures.append(f"min cosine {cosine:.5f} < {MIN_COSINE}")


def run_check(check: Check, device: str) -> Result:
    """Compile, compare and time one check; an error is a failure of that check, not of the others."""
    result, start = Result(check), time.perf_counter()
    try:
        (_embeddings if check.embeddings else _decoder)(check, device, result)
    except Exception as error:  # noqa: BLE001 - reported in the table, the other checks still run
        result.failures.append(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    result.seconds = time.perf_counter() - start
    return result


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: Sequence[Result]) -> str:
    """The table of every check: target, model, encoding, accuracy, TTFT, decode tokens/s at batch 1 and 8,
    concurrency-16 tokens/s (sentences/s for embeddings), verdict."""
    header = ("target", "model", "encoding", "accuracy", "TTFT ms", "tok/s b1", "tok/s b8",
              f"tok/s c{CONCURRENCY}", "result")
    rows = [header]
    for r in results:
        m = r.metrics
        ttft = m.get("ttft_s_b1")
        throughput = (_number(m.get("sentences_per_s")) + " sent/s" if r.check.embeddings
                      else _number(m.get(f"concurrency{CONCURRENCY}_tok_s")))
        rows.append((r.check.target, r.check.model, r.check.encoding, r.accuracy or "-",
                     _number(None if ttft is None else 1000 * ttft), _number(m.get("decode_tok_s_b1")),
                     _number(m.get("decode_tok_s_b8")), throughput,
                     "PASS" if r.passed else "FAIL: " + "; ".join(r.failures)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ember.tools.gpu_check",
        description="Compile SmolLM2 and all-MiniLM-L6-v2 for the GPU targets, compare them with transformers and "
                    "time them, on a machine with an NVIDIA GPU. Installs nothing; exit 2 names what is missing.")
    parser.add_argument("--target", choices=TARGETS, action="append",
                        help="check this target only (repeatable; default: all)")
    parser.add_argument("--device", default="cuda:0", help="the GPU to run on (cuda or cuda:N; default cuda:0)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    from ember.runtime.session import parse_device

    try:
        device = parse_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if device.kind != "cuda":
        parser.error(f"--device {args.device}: the check runs on a CUDA device")
    args.device_index = device.id
    args.targets = tuple(args.target or TARGETS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = prerequisites(args.targets, args.device_index)
    if missing:
        for line in missing:
            print(f"gpu_check: {line}", file=sys.stderr)
        return EXIT_PREREQUISITES
    results = []
    for check in (c for c in CHECKS if c.target in args.targets):
        print(f"gpu_check: {check.model} {check.encoding} for {check.target} on {args.device} ...", file=sys.stderr)
        results.append(run_check(check, args.device))
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print(format_table(results))
    return EXIT_PASS if all(r.passed for r in results) else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
