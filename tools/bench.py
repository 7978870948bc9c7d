"""Benchmarking ember's text-generation pipeline: time to first token, decode rate, memory bandwidth use.

A run prefills ``batch_size`` copies of a prompt of exactly ``prompt_tokens`` tokens (cut from
``bench_text.txt``) as one batch and decodes ``new_tokens`` greedy tokens per sequence with EOS ignored.
TTFT is the time until every sequence of the batch has its first token; the decode rate is
``(new_tokens - 1)`` steps over the time after that, reported per sequence and in total over the batch.

Several encodings of the same model run in one benchmark: each is its own pipeline (compiled into the
cache on first use), and their runs alternate with each other and with a peer (``bench_hf``,
``bench_ort_genai``) on the same prompt ids, in the same process, so all see the same machine state.
Each encoding's row also says how many weight bytes a decode step reads and which fraction of the
memory bandwidth measured in the same run (``bench_bandwidth``) its decode rate reaches.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ember.runtime.pipelines import SamplingParams

from .bench_bandwidth import artifact_model, bandwidth_fraction, copy_bandwidth, weight_bytes_per_step
from .bench_runner import alternate, load_peer, memory_snapshot, ratio_of, summarize
from .generate import GenerationStats
from .loading import LoadedPipeline

logger = logging.getLogger(__name__)

BENCH_TEXT = Path(__file__).with_name("bench_text.txt")
BANDWIDTH_MIB = 512  # the copy's source: far larger than any cache of the machines we run on


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
    """One measured generation of a batch: its timing per sequence (``GenerationStats``: TTFT of the batch,
    tokens per sequence), the tokens of its first sequence, and whether all sequences produced the same
    tokens (they share the prompt, so greedy decoding must give identical rows)."""

    stats: GenerationStats
    tokens: list[int] = field(default_factory=list)
    batch_size: int = 1
    rows_agree: bool = True

    @property
    def ttft(self) -> float:
        return float(self.stats.first_token_seconds or 0.0)

    @property
    def decode_tps(self) -> float | None:
        """Decode tokens/s of one sequence (= decode steps/s)."""
        return self.stats.decode_tokens_per_second

    @property
    def decode_total_tps(self) -> float | None:
        """Decode tokens/s over the whole batch."""
        rate = self.decode_tps
        return None if rate is None else rate * self.batch_size


class Runner(Protocol):
    """What the benchmark drives: ember's pipeline or a peer implementation on the same weights."""

    name: str
    info: dict[str, Any]  # what the report says about it (source, threads, versions, weight bytes per step)

    def run(self, prompt_ids: list[int], new_tokens: int, batch_size: int = 1) -> RunSample: ...


def loaded_encoding(loaded: LoadedPipeline) -> str:
    """The encoding a loaded pipeline's artifact was compiled with (the architecture's default when the
    user named none)."""
    return str(loaded.pipeline.pipeline_model.artifact.manifest.get("encoding", "?"))


class EmberRunner:
    """Greedy, EOS-ignoring generation on ember's pipeline: ``batch_size`` requests admitted together."""

    def __init__(self, loaded: LoadedPipeline, name: str | None = None):
        self.loaded = loaded
        self.pipeline = loaded.pipeline
        self.encoding = loaded_encoding(loaded)
        self.name = name or f"ember {self.encoding}"
        self.info: dict[str, Any] = {"encoding": self.encoding}

    def run(self, prompt_ids: list[int], new_tokens: int, batch_size: int = 1) -> RunSample:
        sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
        contexts = [self.pipeline.new_context(prompt_ids, sampling) for _ in range(batch_size)]
        waiting = {c.request_id for c in contexts}
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        start = time.perf_counter()
        for step in self.pipeline.generate(contexts, num_steps=1):
            if waiting:
                waiting.difference_update(step)
                if not waiting:
                    stats.first_token_seconds = time.perf_counter() - start
        stats.total_seconds = time.perf_counter() - start
        stats.generated_tokens = min(len(c.generated) for c in contexts)
        first = contexts[0]
        stats.finish_reason = first.finish_reason.value if first.finish_reason else None
        rows_agree = all(c.generated == first.generated for c in contexts)
        return RunSample(stats, list(first.generated), batch_size, rows_agree)

    def forced_argmax(self, prompt_ids: list[int], tokens: Sequence[int]) -> list[int]:
        """The argmax after the prompt and after each of ``tokens[:i]`` fed in (teacher forcing): the greedy
        choice at every step of another runner's sequence, which stays comparable after the sequences part."""
        import numpy as np

        model = self.pipeline.pipeline_model
        context = self.pipeline.new_context(prompt_ids)
        predicted: list[int] = []
        try:
            inputs = model.prepare_initial_token_inputs([context])
            for i, token in enumerate(tokens):
                predicted.append(int(np.argmax(model.execute(inputs).next_token_logits[0])))
                if i + 1 == len(tokens):
                    break
                context.start_idx = context.active_idx
                context.tokens.append(int(token))
                inputs = model.prepare_next_token_inputs(np.array([token]), inputs)
        finally:
            model.release(context.request_id)
        return predicted


def _summary(samples: list[RunSample]) -> dict[str, Any]:
    """Median, min and max of each metric, and each run's values (run i of every runner ran in round i)."""
    return {"ttft_s": summarize([s.ttft for s in samples]),
            "decode_tok_s": summarize([s.decode_total_tps for s in samples]),
            "decode_tok_s_per_seq": summarize([s.decode_tps for s in samples]),
            "per_run": {"ttft_s": [s.ttft for s in samples], "decode_tok_s": [s.decode_total_tps for s in samples]},
            "generated_tokens": [s.stats.generated_tokens for s in samples],
            "batch_rows_agree": all(s.rows_agree for s in samples)}


def _ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """ember over the peer: of the medians, and the median of the ratios within each round (the runners of a
    round ran back to back, so a paired ratio cancels much of the noise of a shared machine)."""
    def paired(key: str) -> float | None:
        pairs = [ratio_of(a, b) for a, b in zip(ours["per_run"][key], theirs["per_run"][key])]
        return summarize(pairs)["median"]

    return {"decode_tok_s": ratio_of(ours["decode_tok_s"]["median"], theirs["decode_tok_s"]["median"]),
            "ttft": ratio_of(ours["ttft_s"]["median"], theirs["ttft_s"]["median"]),
            "decode_tok_s_paired": paired("decode_tok_s"), "ttft_paired": paired("ttft_s")}


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(reference: Sequence[int], other: Sequence[int], forced: Sequence[int] | None = None) -> dict[str, int]:
    """How far two greedy sequences agree: the common prefix, and positions holding the same token (after
    a first difference the two continue from different text, so the prefix is the strict measure). With
    ``forced`` (the other runner's argmax at each step of the reference's sequence, fed in), also the steps
    at which both would choose the same token: the per-step agreement that a first difference does not end."""
    result = {"matching_prefix": matching_prefix(reference, other),
              "equal_positions": sum(x == y for x, y in zip(reference, other)),
              "of": min(len(reference), len(other))}
    if forced is not None:
        result["teacher_forced_equal"] = sum(x == y for x, y in zip(reference, forced))
        result["teacher_forced_of"] = min(len(reference), len(forced))
    return result


def _agreement(runners: Sequence[Any], samples: dict[str, list[RunSample]], prompt_ids: list[int]) -> dict[str, Any]:
    """Every runner's greedy tokens against the reference's: ember float32 (or the first encoding)."""
    reference = next((r for r in runners if getattr(r, "encoding", None) == "float32"), runners[0])
    tokens = samples[reference.name][0].tokens
    result: dict[str, Any] = {"reference": reference.name, "runners": {}}
    for runner in runners:
        if runner is not reference:
            forced = runner.forced_argmax(prompt_ids, tokens) if hasattr(runner, "forced_argmax") else None
            result["runners"][runner.name] = agreement(tokens, samples[runner.name][0].tokens, forced)
    return result


def check_encodings(model: str | Path | None, encodings: Sequence[str] | None) -> list[str | None]:
    """The encodings to load (``[None]``: the architecture's default), each checked the way the loader
    checks it, so that an encoding the model does not support fails with the loader's error before any
    other encoding is compiled."""
    from ember.runtime.pipelines import ModelSource, PipelineConfig
    from ember.runtime.compile_cache import compile_options

    from .compile_model import architecture_for

    if not encodings:
        return [None]
    source = ModelSource.resolve(model)
    if source.kind == "artifact":
        from ember.compiler.artifact import read_manifest

        compiled = read_manifest(source.path).get("encoding")
        if len(encodings) > 1 or encodings[0] != compiled:
            raise ValueError(f"{source.path} is an artifact compiled with {compiled}; to measure other "
                             f"encodings, benchmark the model it was compiled from")
        return list(encodings)
    architecture = architecture_for(source)
    for encoding in encodings:
        compile_options(PipelineConfig(model_path=model, encoding=encoding), architecture, source)
    return list(encodings)


def load_encodings(model: str | Path | None, encodings: Sequence[str | None], *, num_threads: int | None,
                   batch_size: int, max_length: int, announce: Callable[[str], None] | None = None,
                   kv_cache_bit_width: int = 0) -> tuple[list[LoadedPipeline], list[dict[str, float]]]:
    """A pipeline per encoding (compiled into the cache on first use), each with ``batch_size`` KV cache
    slots of ``max_length`` tokens (the workload's, so that eight slots of a long-context model stay small;
    int8 elements with ``kv_cache_bit_width=8``), and the process's memory after each load."""
    from .loading import load_pipeline, pipeline_config

    pipelines, memory = [], []
    for encoding in encodings:
        if announce is not None:
            announce(f"loading {'the default encoding' if encoding is None else encoding} "
                     f"(compiled on first use, then cached) ...")
        config = pipeline_config(model, encoding=encoding, num_threads=num_threads, max_batch_size=batch_size,
                                 max_length=max_length, kv_cache_bit_width=kv_cache_bit_width)
        pipelines.append(load_pipeline(config))
        memory.append(memory_snapshot())
    return pipelines, memory


def _validate(pipelines: Sequence[LoadedPipeline], prompt_tokens: int, new_tokens: int, batch_size: int,
              runs: int, warmup: int) -> None:
    if not pipelines:
        raise ValueError("nothing to benchmark: no pipeline was loaded")
    if runs < 1 or warmup < 0 or new_tokens < 1 or batch_size < 1:
        raise ValueError("--runs, --new-tokens and --batch-size must be at least 1, --warmup at least 0")
    for loaded in pipelines:
        if prompt_tokens + new_tokens > loaded.pipeline.max_length:
            raise ValueError(f"{prompt_tokens} prompt + {new_tokens} new tokens exceed the maximum length "
                             f"{loaded.pipeline.max_length}")
        slots = loaded.pipeline.pipeline_model.kv_manager.max_batch_size
        if batch_size > slots:
            raise ValueError(f"--batch-size {batch_size} exceeds the pipeline's {slots} KV cache slots")


def _encoding_entry(runner: EmberRunner, memory: dict[str, float] | None) -> dict[str, Any]:
    loaded = runner.loaded
    entry: dict[str, Any] = {"encoding": runner.encoding, "artifact": str(loaded.artifact_path),
                             "setup": loaded.describe(), "compiled": loaded.compiled, "setup_s": loaded.seconds,
                             "weight_bytes_per_step": weight_bytes_per_step(artifact_model(loaded.artifact_path))}
    if memory is not None:
        entry["memory_after_load"] = memory
    return entry


def run_benchmark(loaded: LoadedPipeline | Sequence[LoadedPipeline], *, prompt_tokens: int = 64,
                  new_tokens: int = 128, batch_size: int = 1, runs: int = 5, warmup: int = 1,
                  peer_factory: Callable[[], Any] | None = None, bandwidth_mib: int = BANDWIDTH_MIB,
                  load_memory: Sequence[dict[str, float]] | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure every pipeline (one per encoding) and the peer, when given, and return the report as data.

    ``report["encodings"]`` has a row per encoding; ``report["ember"]`` is the first (or only) one, as
    before encodings could be compared. ``load_memory`` is the memory snapshot taken after each load.
    """
    pipelines = [loaded] if isinstance(loaded, LoadedPipeline) else list(loaded)
    _validate(pipelines, prompt_tokens, new_tokens, batch_size, runs, warmup)
    prompt_ids = prompt_token_ids(pipelines[0].tokenizer, prompt_tokens)
    embers = [EmberRunner(p) for p in pipelines]
    if len({e.name for e in embers}) != len(embers):
        raise ValueError(f"an encoding is listed twice: {', '.join(e.encoding for e in embers)}")
    threads = pipelines[0].num_threads
    memories = list(load_memory) if load_memory is not None else [None] * len(embers)
    report: dict[str, Any] = {
        "artifact": str(pipelines[0].artifact_path), "setup": pipelines[0].describe(), "threads": threads,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch_size": batch_size, "runs": runs,
        "warmup": warmup, "encodings": {e.encoding: _encoding_entry(e, m) for e, m in zip(embers, memories)},
        "memory": {"ember": memory_snapshot()},  # before any peer is loaded
    }
    report["ember"] = report["encodings"][embers[0].encoding]

    def one_run(runner: Any, _run: int = 0) -> RunSample:
        return runner.run(prompt_ids, new_tokens, batch_size)

    for ember in embers:
        for _ in range(warmup):
            one_run(ember)
    runners: list[Any] = list(embers)
    if peer_factory is not None:
        runners.append(load_peer(report, peer_factory, warmup=warmup, warm=one_run))
    # Copies before and after the runs, so the bandwidth is the one of the same machine state.
    rates = copy_bandwidth(bandwidth_mib, repeats=3, threads=threads)["rates"]
    samples = alternate(runners, runs, one_run, progress)
    rates += copy_bandwidth(bandwidth_mib, repeats=3, threads=threads)["rates"]
    report["memory"]["final"] = memory_snapshot()
    bandwidth = summarize(rates)
    gb_s = bandwidth["median"]
    report["bandwidth"] = {"gb_s": gb_s, "min": bandwidth["min"], "max": bandwidth["max"], "copies": len(rates),
                           "source_mib": bandwidth_mib, "threads": threads, "counts": "read + write"}
    for ember in embers:
        entry = report["encodings"][ember.encoding]
        entry.update(_summary(samples[ember.name]))
        entry["bandwidth_fraction"] = bandwidth_fraction(entry["weight_bytes_per_step"],
                                                         entry["decode_tok_s_per_seq"]["median"], gb_s)
    report["greedy_agreement"] = _agreement(runners, samples, prompt_ids)
    if peer_factory is not None:
        peer = runners[-1]
        info = dict(peer.info)
        report["peer"] = {"name": peer.name, **info, **_summary(samples[peer.name])}
        report["peer"]["bandwidth_fraction"] = bandwidth_fraction(
            info.get("weight_bytes_per_step"), report["peer"]["decode_tok_s_per_seq"]["median"], gb_s)
        report["ratios"] = {e.encoding: _ratios(report["encodings"][e.encoding], report["peer"]) for e in embers}
    return report
