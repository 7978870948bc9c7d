"""Benchmarking ember's embeddings pipeline: throughput (sentences/s) and single-sentence latency.

The workload is ``sentences`` sentences of about ``sentence_tokens`` tokens each (special tokens
included), cut from ``bench_text.txt`` as windows of consecutive words. Throughput is one
``encode(sentences, batch_size)`` call; latency is the median of ``latency_encodes`` one-sentence
``encode`` calls. A run measures both; medians (with min and max) are over runs. A peer (``bench_st``)
encodes the same sentences; its runs alternate with ember's in the same process, so both see the same
machine state, and the report gives the lowest cosine similarity between the two sets of embeddings.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .bench import bench_text
from .bench_runner import memory_snapshot, run_alternating, summarize
from .embed import rowwise_cosine
from .loading import LoadedPipeline

logger = logging.getLogger(__name__)

SENTENCES, SENTENCE_TOKENS, BATCH_SIZE, LATENCY_ENCODES = 1024, 30, 32, 50
_STRIDE = 11  # words between window starts (coprime with the text's word count, so every start is used)
_SPREAD = 2  # window targets cycle through SENTENCE_TOKENS - 2 .. + 2, so repeated starts give new sentences


def bench_sentences(tokenizer: Any, count: int = SENTENCES, tokens: int = SENTENCE_TOKENS,
                    text: str | None = None) -> list[str]:
    """``count`` sentences of about ``tokens`` tokens (special tokens included): windows of consecutive
    words of the benchmark text (wrapping around at its end), sized by the words' token counts."""
    if count < 1 or tokens < 1:
        raise ValueError(f"the benchmark needs at least one sentence of at least one token, got {count} x {tokens}")
    words = (bench_text() if text is None else text).split()
    if not words:
        raise ValueError("the benchmark text has no words")
    specials = len(tokenizer.encode(""))
    word_tokens = [max(len(ids), 1) for ids in tokenizer.encode_batch(words, add_special_tokens=False)]
    stride = _STRIDE if len(words) % _STRIDE else _STRIDE + 2
    sentences = []
    for i in range(count):
        target = max(tokens + (i % (2 * _SPREAD + 1)) - _SPREAD, specials + 1)
        start, total = (i * stride) % len(words), specials
        chosen: list[str] = []
        while len(chosen) < len(words):
            position = (start + len(chosen)) % len(words)
            step = word_tokens[position]
            if chosen and abs(total + step - target) >= abs(total - target):
                break
            chosen.append(words[position])
            total += step
        sentences.append(" ".join(chosen))
    return sentences


class EmbeddingsRunner(Protocol):
    """What the benchmark drives: ember's pipeline or a peer implementation on the same weights."""

    name: str

    def encode(self, sentences: list[str], batch_size: int) -> np.ndarray: ...


class EmberEmbeddingsRunner:
    name = "ember"

    def __init__(self, loaded: LoadedPipeline):
        self.pipeline = loaded.pipeline

    def encode(self, sentences: list[str], batch_size: int) -> np.ndarray:
        return self.pipeline.encode(sentences, batch_size=batch_size)


@dataclass
class EmbeddingsSample:
    """One measured run: the batched encode's time, the single-sentence latencies, the embeddings."""

    sentences: int
    batch_seconds: float
    latencies: list[float] = field(default_factory=list)
    embeddings: np.ndarray | None = None

    @property
    def sentences_per_second(self) -> float:
        return self.sentences / self.batch_seconds if self.batch_seconds > 0 else float("inf")

    @property
    def latency(self) -> float:
        return statistics.median(self.latencies)


def measure(runner: Any, sentences: list[str], batch_size: int, latency_encodes: int,
            keep: bool = False) -> EmbeddingsSample:
    start = time.perf_counter()
    embeddings = runner.encode(sentences, batch_size)
    sample = EmbeddingsSample(len(sentences), time.perf_counter() - start, embeddings=embeddings if keep else None)
    for i in range(latency_encodes):
        sentence = [sentences[i % len(sentences)]]
        start = time.perf_counter()
        runner.encode(sentence, 1)
        sample.latencies.append(time.perf_counter() - start)
    return sample


def _summary(samples: list[EmbeddingsSample]) -> dict[str, Any]:
    return {"sentences_per_s": summarize([s.sentences_per_second for s in samples]),
            "latency_s": summarize([s.latency for s in samples])}


def _kept_embeddings(samples: list[EmbeddingsSample]) -> np.ndarray:
    """The embeddings the first run kept (``keep=run == 0``), to compare the implementations on."""
    embeddings = samples[0].embeddings
    if embeddings is None:
        raise RuntimeError("the first run kept no embeddings")
    return embeddings


def run_embeddings_benchmark(loaded: LoadedPipeline, *, sentences: int = SENTENCES, batch_size: int = BATCH_SIZE,
                             sentence_tokens: int = SENTENCE_TOKENS, latency_encodes: int = LATENCY_ENCODES,
                             runs: int = 5, warmup: int = 1, peer_factory: Callable[[], Any] | None = None,
                             progress: bool = True) -> dict[str, Any]:
    """Measure ember (and the peer, when given) and return the report as plain data."""
    if runs < 1 or warmup < 0 or sentences < 1 or batch_size < 1 or latency_encodes < 1:
        raise ValueError("--runs, --sentences, --batch-size and the latency encodes must be at least 1, "
                         "--warmup at least 0")
    texts = bench_sentences(loaded.tokenizer, sentences, sentence_tokens)
    lengths = [len(ids) for ids in loaded.pipeline.tokenize(texts)]
    ember = EmberEmbeddingsRunner(loaded)
    for _ in range(warmup):
        measure(ember, texts, batch_size, min(latency_encodes, 5))
    report: dict[str, Any] = {
        "task": "embeddings", "artifact": str(loaded.artifact_path), "setup": loaded.describe(),
        "encoding": loaded.pipeline.pipeline_model.artifact.manifest["encoding"],
        "threads": loaded.num_threads, "sentences": sentences, "batch_size": batch_size,
        "sentence_tokens": {"target": sentence_tokens, "mean": statistics.fmean(lengths), "min": min(lengths),
                            "max": max(lengths)},
        "latency_encodes": latency_encodes, "runs": runs, "warmup": warmup,
        "ember": {"compiled": loaded.compiled, "setup_s": loaded.seconds},
        "memory": {"ember": memory_snapshot()},  # before any peer is loaded
    }
    samples: dict[str, list[EmbeddingsSample]] = run_alternating(
        report, ember, peer_factory, warmup=warmup, runs=runs, progress=progress,
        warm=lambda runner: measure(runner, texts, batch_size, min(latency_encodes, 5)),
        measure=lambda runner, run: measure(runner, texts, batch_size, latency_encodes, keep=run == 0),
        summary=_summary, ratios={"sentences_per_s": "sentences_per_s", "latency": "latency_s"})
    ours = _kept_embeddings(samples["ember"])
    report["ember"]["dim"] = int(ours.shape[1])
    if peer_factory is not None:
        theirs = _kept_embeddings(samples[report["peer"]["name"]])
        similarity = rowwise_cosine(ours, theirs)
        worst = int(np.argmin(similarity))
        report["agreement"] = {"min_cosine": float(similarity[worst]), "mean_cosine": float(similarity.mean()),
                               "worst_sentence": worst, "of": len(similarity),
                               "max_abs_diff": float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)))}
    return report
