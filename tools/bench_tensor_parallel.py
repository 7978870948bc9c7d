"""Decode speed over 1, 2, ... tensor-parallel ranks, with the collectives' share of a step.

Each ``--tensor-parallel`` count is compiled (the compile cache) and loaded as ``ember generate`` would load it (the
ranks are processes on this machine, joined by torch.distributed over gloo, the ``--threads`` shared among them).
A run generates ``--new-tokens`` greedy tokens after a ``--context``-token prompt at ``--batch`` rows; the counts take
turns run by run (``bench_paged_decode.time_generation``). Reported per count: the median step time, its ratio to the
first count's, and on rank 0 per step: collectives, bytes they carried in, and the seconds inside them.

    python -m ember.tools.bench_tensor_parallel MODEL [--tensor-parallel 1 2] [--encoding float32] [--runs 3]

BENCHMARKS.md "Tensor parallelism" has the figures, and the arithmetic for a GPU node.
"""
from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import dataclass
from typing import Any

from .bench_paged_decode import time_generation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallelTime:
    """One rank count's figures (module docstring); the collective ones are per decode step, on rank 0."""

    ranks: int
    step_s: float
    ratio: float
    collectives: float = 0.0
    collective_bytes: float = 0.0
    collective_s: float = 0.0


def load(model: str, ranks: int, encoding: str | None, threads: int, max_length: int, batch: int) -> Any:
    from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig

    config = PipelineConfig(model_path=model, encoding=encoding, tensor_parallel=ranks, num_threads=threads,
                            max_length=max_length, max_batch_size=batch, kv_cache_strategy="paged")
    return PIPELINE_REGISTRY.retrieve(config)[1]


def collective_counters(pipeline: Any) -> tuple[int, int, float]:
    """``(calls, bytes, seconds)`` of rank 0's collectives so far (zeros on one rank)."""
    staged = getattr(pipeline.pipeline_model.model, "local", None)
    if staged is None:
        return 0, 0, 0.0
    stats = staged.communicator.stats
    calls = sum(stats.calls.get(op, 0) for op in ("all_reduce", "all_gather"))
    sent = sum(stats.bytes.get(op, 0) for op in ("all_reduce", "all_gather"))
    return calls, sent, staged.collective_seconds


def run(model: str, counts: list[int], encoding: str | None, batch: int, context: int, new_tokens: int, runs: int,
        threads: int) -> list[TensorParallelTime]:
    pipelines = [load(model, n, encoding, threads, context + new_tokens + 1, batch) for n in counts]
    try:
        for pipeline in pipelines:  # warm-up
            time_generation(pipeline, batch, min(context, 8), 4)
        steps = [[0.0] * len(pipelines) for _ in range(runs)]
        per_step: list[list[tuple[float, float, float]]] = [[] for _ in pipelines]
        for r in range(runs):
            for k in [(r + i) % len(pipelines) for i in range(len(pipelines))]:
                before = collective_counters(pipelines[k])
                steps[r][k], _ = time_generation(pipelines[k], batch, context, new_tokens)
                after = collective_counters(pipelines[k])
                calls = new_tokens  # model runs: the prompt's and one per new token but the last
                collectives, sent, seconds = ((a - b) / calls for a, b in zip(after, before))
                per_step[k].append((collectives, sent, seconds))
        return [TensorParallelTime(n, statistics.median(row[k] for row in steps),
                                   statistics.median(row[k] / row[0] for row in steps),
                                   *(statistics.median(v[i] for v in per_step[k]) for i in range(3)))
                for k, n in enumerate(counts)]
    finally:
        for pipeline in pipelines:
            group = getattr(pipeline.pipeline_model.model, "group", None)
            if group is not None:
                group.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tensor-parallel", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--encoding", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per run (default 64)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads of all ranks together (default 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = run(args.model, args.tensor_parallel, args.encoding, args.batch, args.context, args.new_tokens,
                  args.runs, args.threads)
    print("| ranks | ms / step | x first | collectives / step | KiB / step | ms in collectives / step |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        print(f"| {result.ranks} | {result.step_s * 1e3:.2f} | {result.ratio:.2f} | {result.collectives:.0f} | "
              f"{result.collective_bytes / 1024:.1f} | {result.collective_s * 1e3:.2f} |")


if __name__ == "__main__":
    main()
