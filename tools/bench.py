"""Benchmarking ember's text-generation pipeline at batch 1: time to first token, decode rate, memory.

A run prefills a prompt of exactly ``prompt_tokens`` tokens (cut from ``bench_text.txt``) and decodes
``new_tokens`` greedy tokens with EOS ignored. The decode rate is ``(new_tokens - 1)`` over the time after
the first token. A peer (``bench_hf``) may run the same prompt ids; its runs alternate with ember's in the
same process, so both see the same machine state.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ember.runtime.pipelines import SamplingParams

from .bench_runner import memory_snapshot, run_alternating, summarize
from .generate import GenerationStats
from .loading import LoadedPipeline

logger = logging.getLogger(__name__)

BENCH_TEXT = Path(__file__).with_name("bench_text.txt")


def bench_text() -> str:
    return BENCH_TEXT.read_text(encoding="utf-8")


def prompt_token_ids(tokenizer: Any, count: int, text: str | None = None) -> list[int]:
    """Exactly ``count`` token ids: the text's (repeated if it is too short), cut to length."""
    if count < 1:
        raise ValueError(f"the prompt needs at least one token, got {count}")
    text = bench_text() if text is None else text
    ids = tokenizer.encode(text)
    body = tokenizer.encode(text, add_special_tokens=False)
    if not body:
        raise ValueError("the benchmark text encodes to no tokens")
    while len(ids) < count:
        ids += body
    return ids[:count]


@dataclass
class RunSample:
    """One measured generation: its timing (``GenerationStats``) and the tokens it produced."""

    stats: GenerationStats
    tokens: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return float(self.stats.first_token_seconds or 0.0)

    @property
    def decode_tps(self) -> float | None:
        return self.stats.decode_tokens_per_second


class Runner(Protocol):
    """What the benchmark drives: ember's pipeline or a peer implementation on the same weights."""

    name: str

    def run(self, prompt_ids: list[int], new_tokens: int) -> RunSample: ...


class EmberRunner:
    """Greedy, EOS-ignoring generation on ember's pipeline, one request at a time."""

    name = "ember"

    def __init__(self, loaded: LoadedPipeline):
        self.loaded = loaded
        self.pipeline = loaded.pipeline

    def run(self, prompt_ids: list[int], new_tokens: int) -> RunSample:
        sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
        context = self.pipeline.new_context(prompt_ids, sampling)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        start = time.perf_counter()
        for step in self.pipeline.generate([context], num_steps=1):
            if stats.first_token_seconds is None and context.request_id in step:
                stats.first_token_seconds = time.perf_counter() - start
        stats.total_seconds = time.perf_counter() - start
        stats.generated_tokens = len(context.generated)
        stats.finish_reason = context.finish_reason.value if context.finish_reason else None
        return RunSample(stats, list(context.generated))


def _summary(samples: list[RunSample]) -> dict[str, Any]:
    return {"ttft_s": summarize([s.ttft for s in samples]),
            "decode_tok_s": summarize([s.decode_tps for s in samples]),
            "generated_tokens": [s.stats.generated_tokens for s in samples]}


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_benchmark(loaded: LoadedPipeline, *, prompt_tokens: int = 64, new_tokens: int = 128, runs: int = 5,
                  warmup: int = 1, peer_factory: Callable[[], Any] | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Measure ember (and the peer, when given) and return the report as plain data."""
    if runs < 1 or warmup < 0 or new_tokens < 1:
        raise ValueError("--runs and --new-tokens must be at least 1, --warmup at least 0")
    if prompt_tokens + new_tokens > loaded.pipeline.max_length:
        raise ValueError(f"{prompt_tokens} prompt + {new_tokens} new tokens exceed the maximum length "
                         f"{loaded.pipeline.max_length}")
    prompt_ids = prompt_token_ids(loaded.tokenizer, prompt_tokens)
    ember = EmberRunner(loaded)
    for _ in range(warmup):
        ember.run(prompt_ids, new_tokens)
    report: dict[str, Any] = {
        "artifact": str(loaded.artifact_path), "setup": loaded.describe(), "threads": loaded.num_threads,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
        "ember": {"compiled": loaded.compiled, "setup_s": loaded.seconds},
        "memory": {"ember": memory_snapshot()},  # before any peer is loaded
    }
    samples: dict[str, list[RunSample]] = run_alternating(
        report, ember, peer_factory, warmup=warmup, runs=runs, progress=progress,
        warm=lambda runner: runner.run(prompt_ids, new_tokens),
        measure=lambda runner, run: runner.run(prompt_ids, new_tokens),
        summary=_summary, ratios={"decode_tok_s": "decode_tok_s", "ttft": "ttft_s"})
    if peer_factory is not None:
        first_ember, first_peer = samples["ember"][0].tokens, samples[report["peer"]["name"]][0].tokens
        report["greedy_agreement"] = {"matching_prefix": matching_prefix(first_ember, first_peer),
                                      "of": min(len(first_ember), len(first_peer))}
    return report
