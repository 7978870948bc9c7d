"""What the text-generation and the embeddings benchmarks share: loading the peer, alternating the runs of
ember (one runner per encoding) and the peer in the same process (so all see the same machine state), and
the summaries, memory snapshots and ember/peer ratios of the report."""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psutil
from tqdm.auto import tqdm

MIB = 2**20


def memory_snapshot() -> dict[str, float]:
    """Peak RSS of the process so far (``ru_maxrss``) and its current RSS (psutil), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    return {"peak_rss_mib": peak_bytes / MIB, "rss_mib": psutil.Process(os.getpid()).memory_info().rss / MIB}


def summarize(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, min and max of the values that exist."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(present), "min": min(present), "max": max(present)}


def ratio_of(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing (or ``b`` is 0)."""
    return a / b if a is not None and b else None


def load_peer(report: dict[str, Any], peer_factory: Callable[[], Any], *, warmup: int,
              warm: Callable[[Any], Any]) -> Any:
    """Build the peer, recording its setup time and the memory with it loaded, and warm it up."""
    start = time.perf_counter()
    peer = peer_factory()
    report["peer_setup_s"] = time.perf_counter() - start
    report["memory"]["with_peer"] = memory_snapshot()
    for _ in range(warmup):
        warm(peer)
    return peer


def alternate(runners: Sequence[Any], runs: int, measure: Callable[[Any, int], Any],
              progress: bool = True) -> dict[str, list[Any]]:
    """``runs`` rounds of one measured run per runner, in turn (a, b, c, a, b, c, ...), so that every
    runner sees the same machine state; the samples by runner name."""
    samples: dict[str, list[Any]] = {r.name: [] for r in runners}
    for run in tqdm(range(runs), desc="bench", unit="run", disable=not progress, file=sys.stderr, leave=False):
        for runner in runners:
            samples[runner.name].append(measure(runner, run))
    return samples


def run_alternating(report: dict[str, Any], ember: Any, peer_factory: Callable[[], Any] | None, *,
                    warmup: int, runs: int, warm: Callable[[Any], Any], measure: Callable[[Any, int], Any],
                    summary: Callable[[list[Any]], dict[str, Any]], ratios: Mapping[str, str],
                    progress: bool = True) -> dict[str, list[Any]]:
    """Load the peer (when given) and warm it up, then ``runs`` times measure ember and the peer in turn.

    ``warm(runner)`` is one unmeasured run, ``measure(runner, run)`` the sample of measured run ``run``
    (0-based). ``report`` (with ``report["ember"]`` and ``report["memory"]["ember"]`` already there) gets
    the peer's setup time, the memory with the peer and at the end, ``summary(samples)`` for ember and the
    peer, and for the peer ``ratios``: for each ratio name, ember's median of a summary key over the peer's.
    Returns the samples by runner name.
    """
    runners = [ember]
    if peer_factory is not None:
        runners.append(load_peer(report, peer_factory, warmup=warmup, warm=warm))
    samples = alternate(runners, runs, measure, progress)
    report["ember"].update(summary(samples[ember.name]))
    report["memory"]["final"] = memory_snapshot()
    if peer_factory is not None:
        name = runners[1].name
        report["peer"] = {"name": name, **getattr(runners[1], "info", {}), **summary(samples[name])}
        ours, theirs = report["ember"], report["peer"]
        report["ratios"] = {ratio: ratio_of(ours[key]["median"], theirs[key]["median"])
                            for ratio, key in ratios.items()}
    return samples
