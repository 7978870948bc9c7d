"""Serving benchmark: N concurrent requests through the engine (continuous batching).

``concurrency`` requests (``prompt_tokens``-token prompts cut at different offsets of ``bench_text.txt``, so
no two share a prefix, ``new_tokens`` greedy tokens each, EOS ignored) are all submitted at once to an
:class:`~ember.runtime.engine.LLMEngine`, or arrive at a request rate (Poisson, seeded), as a server sees them. Reported: total output tokens/s over the wall time, time to
first token per request (median, p90) and inter-token latency (the gaps between a request's consecutive
tokens, median and p90 over all requests).

The prefix-cache scenario times the first token of a ``prefix_prompt_tokens``-token prompt twice: once
cold (a miss) and once after another request with the same first ``shared_tokens`` tokens has finished
(a hit: only the rest is computed).
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ember.runtime.engine import LLMEngine
from ember.runtime.pipelines import SamplingParams
from ember.runtime.scheduler import SchedulerConfig, describe

from .bench import bench_text

logger = logging.getLogger(__name__)


def distinct_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens, each starting at a different offset of the bench text."""
    body = tokenizer.encode(bench_text(), add_special_tokens=False)
    while len(body) < length + 7 * count:
        body = body + body
    return [body[7 * i:7 * i + length] for i in range(count)]


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def arrival_offsets(count: int, request_rate: float | None, seed: int = 0) -> list[float]:
    """Seconds after the start at which each of ``count`` requests arrives: all at 0 without a rate, else a
    Poisson process of ``request_rate`` requests per second (exponential gaps, seeded: every run and every
    configuration sees the same arrivals; vLLM's ``benchmark_serving --request-rate``), the first at 0."""
    if request_rate is None:
        return [0.0] * count
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, count)
    gaps[0] = 0.0
    return [float(t) for t in np.cumsum(gaps)]


def run_concurrent(engine: LLMEngine, prompts: Sequence[Sequence[int]], new_tokens: int,
                   arrivals: Sequence[float] | None = None) -> dict[str, Any]:
    """Submit each prompt at its arrival offset (all at once by default), step to completion; throughput, TTFT
    (from each request's own arrival) and inter-token latency. Waits idle only while nothing runs."""
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    offsets = list(arrivals) if arrivals is not None else [0.0] * len(prompts)
    start = time.perf_counter()
    waiting = sorted(zip(offsets, range(len(prompts))))
    submitted: dict[str, float] = {}
    stamps: dict[str, list[float]] = {}
    while waiting or engine.has_unfinished_requests():
        now = time.perf_counter()
        while waiting and now - start >= waiting[0][0]:
            offset, index = waiting.pop(0)
            request_id = engine.add_request(prompts[index], sampling)
            submitted[request_id], stamps[request_id] = start + offset, []
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, start + waiting[0][0] - time.perf_counter()))
            continue
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.token is not None:
                stamps[out.request_id].append(now)
    return summarize_stamps(submitted, stamps, time.perf_counter() - start)


def summarize_stamps(submitted: dict[str, float], stamps: dict[str, list[float]], wall: float,
                     output_tokens: int | None = None) -> dict[str, Any]:
    """Throughput, TTFT and inter-token latency from each request's submit time and token arrival times
    (``output_tokens``: the count, when a stamp may stand for several tokens, as an HTTP chunk may)."""
    ttft = [s[0] - submitted[r] for r, s in stamps.items() if s]
    gaps = [b - a for s in stamps.values() for a, b in zip(s, s[1:])]
    total = sum(len(s) for s in stamps.values()) if output_tokens is None else output_tokens
    return {"requests": len(submitted), "output_tokens": total, "wall_s": wall, "output_tok_s": total / wall,
            "ttft_s": {"median": _percentile(ttft, 50), "p90": _percentile(ttft, 90)},
            "itl_s": {"median": _percentile(gaps, 50), "p90": _percentile(gaps, 90)}}


def median_of_runs(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The medians over runs of :func:`summarize_stamps`' figures (throughput, TTFT and ITL median and p90)."""
    def median(values: list[float | None]) -> float:
        present = [v for v in values if v is not None]
        return float(np.median(present)) if present else float("nan")

    return {"output_tok_s": median([x["output_tok_s"] for x in samples]),
            "ttft_median_s": median([x["ttft_s"]["median"] for x in samples]),
            "ttft_p90_s": median([x["ttft_s"]["p90"] for x in samples]),
            "itl_median_s": median([x["itl_s"]["median"] for x in samples]),
            "itl_p90_s": median([x["itl_s"]["p90"] for x in samples])}


def run_concurrency_benchmark(pipeline: Any, tokenizer: Any, levels: Sequence[int], *, prompt_tokens: int = 64,
                              new_tokens: int = 128, runs: int = 3, scheduler: SchedulerConfig | None = None,
                              peer: Any = None, peer_batch: int = 8,
                              request_rate: float | None = None) -> dict[str, Any]:
    """Each concurrency level ``runs`` times (levels interleaved per round); medians per level. ``peer``
    (``--compare``): in each round after the levels, the peer generates a static batch of ``peer_batch`` copies of
    the first prompt, as many new tokens each; its output tok/s (median) and each level's ratio to it.
    ``request_rate``: a level's requests arrive at this rate (:func:`arrival_offsets`), not all at once."""
    max_level = max(levels)
    if max_level > pipeline.pipeline_model.max_batch_size:
        raise ValueError(f"concurrency {max_level} exceeds the pipeline's batch limit "
                         f"{pipeline.pipeline_model.max_batch_size}; load it with --max-batch-size {max_level}")
    prompts = distinct_prompts(tokenizer, max_level, prompt_tokens)
    samples: dict[int, list[dict[str, Any]]] = {n: [] for n in levels}
    peer_rates: list[float] = []
    stats: dict[int, dict[str, Any]] = {}
    run_concurrent(LLMEngine(pipeline, scheduler), prompts[:1], 4)  # warm-up
    for _ in range(runs):
        for n in levels:
            engine = LLMEngine(pipeline, scheduler)
            samples[n].append(run_concurrent(engine, prompts[:n], new_tokens, arrival_offsets(n, request_rate)))
            stats[n] = describe(engine.scheduler.stats)
        if peer is not None:
            sample = peer.run(list(prompts[0]), new_tokens, batch_size=peer_batch)
            peer_rates.append(peer_batch * sample.stats.generated_tokens / sample.stats.total_seconds)
    report: dict[str, Any] = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs,
                              "request_rate": request_rate, "levels": {}}
    for n in levels:
        report["levels"][n] = {**median_of_runs(samples[n]), "scheduler": stats[n], "samples": samples[n]}
    base = report["levels"][min(levels)]["output_tok_s"]
    for n in levels:
        report["levels"][n]["speedup_vs_lowest"] = report["levels"][n]["output_tok_s"] / base
    if peer_rates:
        rate = statistics.median(peer_rates)
        report["peer"] = {"name": peer.name, "batch_size": peer_batch, "output_tok_s": rate,
                          "output_tok_s_min": min(peer_rates), "output_tok_s_max": max(peer_rates)}
        for n in levels:
            report["levels"][n]["ratio_to_peer"] = report["levels"][n]["output_tok_s"] / rate
    return report


def time_first_token(engine: LLMEngine, prompt: Sequence[int]) -> float:
    """Seconds from submitting ``prompt`` to its first token (the engine otherwise idle); then finishes it."""
    start = time.perf_counter()
    request_id = engine.add_request(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
    while True:
        if any(o.request_id == request_id and o.token is not None for o in engine.step()):
            return time.perf_counter() - start


def run_prefix_cache_benchmark(pipeline: Any, tokenizer: Any, *, prompt_tokens: int = 512, shared_tokens: int = 448,
                               runs: int = 3) -> dict[str, Any]:
    """TTFT of a prompt whose first ``shared_tokens`` tokens are cached (hit) against a cold one (miss)."""
    body = tokenizer.encode(bench_text(), add_special_tokens=False)
    while len(body) < 2 * prompt_tokens * (runs + 1):
        body = body + body
    misses, hits = [], []
    for run in range(runs + 1):  # the first round warms up
        offset = 2 * prompt_tokens * run
        base = body[offset:offset + prompt_tokens]
        other = base[:shared_tokens] + body[offset + prompt_tokens:offset + 2 * prompt_tokens - shared_tokens]
        engine = LLMEngine(pipeline, SchedulerConfig(max_num_batched_tokens=prompt_tokens))
        miss = time_first_token(engine, base)  # cold: nothing of it is cached
        hit = time_first_token(engine, other)  # shares base's first shared_tokens tokens
        if run:
            misses.append(miss)
            hits.append(hit)
    miss, hit = float(np.median(misses)), float(np.median(hits))
    return {"prompt_tokens": prompt_tokens, "shared_tokens": shared_tokens, "runs": runs,
            "ttft_miss_s": miss, "ttft_hit_s": hit, "speedup": miss / hit, "samples": {"miss": misses, "hit": hits}}
