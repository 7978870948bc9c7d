"""Time decode steps of compiled artifacts side by side, through the runtime: paged forms against the continuous graph.

Each artifact (a compiled directory: ``ember compile``, or the compile cache's ``artifacts/<key>``) is loaded as a
text-generation pipeline, exactly as ``ember generate`` would run it (its backend, KV buffers bound in place). A run
generates ``--new-tokens`` greedy tokens for ``--batch`` rows of a ``--context``-token prompt; a step's time is the
wall time from the first token to the last over the steps between. The artifacts take turns run by run (the order
rotating), so load from other processes falls on each alike; reported per artifact: the median step time, the time
inside the model's ``execute`` (the rest is the host's: scheduling, sampling, page tables), and the median of the
per-round ratios to the first artifact.

    python -m ember.tools.bench_paged_decode ARTIFACT [ARTIFACT ...] [--batch 1 8] [--context 64 960] [--runs 3]

Why whole generations rather than single ``session.run`` calls alternating between sessions: onnxruntime's
intra-op threads spin for a while after a run, so a session that runs right after another one shares the cores
with the other's spinning threads (a SmolLM2 q4_0 decode step measured 11 ms that way against 5.2 ms in the
runtime). BENCHMARKS.md "Paged decode path" has the table and the command.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepTime:
    """One artifact's result: ``name`` (encoding, strategy, attention forms), median seconds per step and inside
    ``execute``, and the median ratio of its step time to the first artifact's."""

    name: str
    step_s: float
    execute_s: float
    ratio: float


def describe(pipeline: Any) -> str:
    manifest = pipeline.pipeline_model.artifact.manifest
    forms = sorted({lowering["form"] for lowering in manifest.get("lowerings", [])})
    return f"{manifest['encoding']} {manifest['kv_cache_strategy']}: {'; '.join(forms)}"


def load(artifact: Path, threads: int, batch: int, max_length: int) -> Any:
    from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig

    _, pipeline = PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=artifact, num_threads=threads,
                                                            max_length=max_length, max_batch_size=batch,
                                                            decode_slots=0))  # the artifact's own graph
    return pipeline


def time_generation(pipeline: Any, batch: int, context: int, new_tokens: int) -> tuple[float, float]:
    """``(seconds per step, seconds inside execute per step)`` of one greedy generation past the first token."""
    from ember.runtime.pipelines import SamplingParams

    contexts = [pipeline.new_context([100 + (row + i) % 1000 for i in range(context)],
                                     SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                for row in range(batch)]
    model = pipeline.pipeline_model
    inside = [0.0]
    execute = model.execute

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return execute(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - start

    model.execute = timed
    try:
        first = inside_first = 0.0
        for i, _ in enumerate(pipeline.generate(contexts)):
            if i == 0:
                first, inside_first = time.perf_counter(), inside[0]
        end = time.perf_counter()
    finally:
        del model.execute  # the instance attribute goes; the method is back
    steps = max(new_tokens - 1, 1)
    return (end - first) / steps, (inside[0] - inside_first) / steps


def run(artifacts: list[Path], batch: int, context: int, new_tokens: int, runs: int, threads: int) -> list[StepTime]:
    pipelines = [load(path, threads, batch, context + new_tokens + 1) for path in artifacts]
    for pipeline in pipelines:  # warm-up
        time_generation(pipeline, batch, min(context, 8), 4)
    steps = [[0.0] * len(pipelines) for _ in range(runs)]
    inside = [[0.0] * len(pipelines) for _ in range(runs)]
    for r in range(runs):
        for k in [(r + i) % len(pipelines) for i in range(len(pipelines))]:
            steps[r][k], inside[r][k] = time_generation(pipelines[k], batch, context, new_tokens)
    return [StepTime(describe(pipeline), statistics.median(row[k] for row in steps),
                     statistics.median(row[k] for row in inside),
                     statistics.median(row[k] / row[0] for row in steps))
            for k, pipeline in enumerate(pipelines)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--context", type=int, nargs="+", default=[64], help="prompt tokens (default 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per run (default 64)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("decode steps through the runtime, %d threads, %d new tokens, median of %d runs", args.threads,
                args.new_tokens, args.runs)
    for batch in args.batch:
        for context in args.context:
            for result in run(args.artifacts, batch, context, args.new_tokens, args.runs, args.threads):
                logger.info("batch %3d  context %5d  %8.2f ms/step  execute %8.2f ms  x%.3f  %s", batch, context,
                            result.step_s * 1e3, result.execute_s * 1e3, result.ratio, result.name)


if __name__ == "__main__":
    main()
