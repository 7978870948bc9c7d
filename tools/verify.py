"""``ember verify``: how far a compiled model is from its float32 reference, judged by per-encoding thresholds.

Why a command and not only tests: quantized encodings trade accuracy for speed, and how much they trade
depends on the model and on the machine's kernels (onnxruntime's int8 paths differ with AVX2, AVX-512 VNNI
and AMX). So the same measurement runs for any model, on the machine that serves it, and ``ember compile``
runs its short form on every quantized artifact it writes and records the figures in the manifest.

What runs: a shipped English text (``data/verify_text.txt``, a few hundred tokens) teacher-forced through
ember and through the reference, and a few greedy continuations (metrics and thresholds:
:mod:`.verify_metrics`). The reference is ``transformers`` in float32 on the same weights where torch is
installed, else ember's own float32 build of the source (what a deployment machine has).
"""
from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ember.compiler.artifact import Artifact, update_manifest, verify_artifact
from ember.runtime.pipelines import (PIPELINE_REGISTRY, ModelSource, PipelineConfig, PipelineTask, ReturnLogits,
                                     SamplingParams, upper_bounded_default)
from ember.runtime.compile_cache import resolve_encoding, source_sha256

from .verify_metrics import (ENCODING_CLASSES, Agreement, Thresholds, format_table, greedy_agreement,
                             teacher_forced_agreement, thresholds_for)

logger = logging.getLogger(__name__)

MAX_TOKENS = 1024  # teacher-forced positions at most (a longer --text is cut)
MIN_DISTINCT_IDS = 32  # fewer distinct ids from the text: the tokenizer does not know English
RANDOM_TOKENS = 256  # then: this many seeded random ids instead
REFERENCES = ("auto", "transformers", "ember")
#: CPU features that decide which quantized kernels onnxruntime runs (x86 and Arm names as /proc/cpuinfo has them).
KERNEL_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm",
                    "sve", "sve2", "bf16")


@dataclass(frozen=True)
class Workload:
    """How much text and generation one verification runs."""

    tokens: int | None  # teacher-forced positions at most; None: the whole text (up to MAX_TOKENS)
    prompts: int  # greedy prompts, windows of the text
    prompt_tokens: int
    new_tokens: int  # greedy tokens per prompt


FULL = Workload(tokens=None, prompts=4, prompt_tokens=24, new_tokens=32)
SHORT = Workload(tokens=64, prompts=2, prompt_tokens=16, new_tokens=16)  # `ember compile`'s short form


@dataclass(frozen=True)
class VerifyOptions:
    """What to verify and how: the CLI's options, resolved."""

    model: str | Path | None  # None: the embedded SmolLM2
    encoding: str | None = None
    kv_cache_strategy: str | None = None
    target: str | None = None  # None: ort-cpu (for an artifact: the one it was compiled for)
    device: str | None = None  # None: device 0 of the target's kind
    reference: str = "auto"  # auto | transformers | ember
    workload: Workload = FULL
    text: Path | None = None  # None: the shipped text
    max_length: int | None = None  # the pipelines' maximum length (default: the model's); the text is cut to fit
    num_threads: int | None = None
    cache_dir: Path | None = None


@dataclass(frozen=True)
class Reference:
    """A float32 model: the logits ``[rows, len, vocab]`` of every position of equally long token rows."""

    description: str
    logits: Callable[[list[list[int]]], np.ndarray]


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of one verification: what was compared, the figures, and the thresholds' verdict."""

    model: str
    encoding: str
    target: str
    kv_cache_strategy: str
    threshold_class: str
    thresholds: Thresholds
    reference: str
    text: str
    agreement: Agreement
    seconds: float
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def format(self) -> str:
        cpu = cpu_description()
        head = (f"ember verify: {self.model}, {self.encoding} ({self.threshold_class} thresholds), {self.target}, "
                f"{self.kv_cache_strategy} KV cache\nreference: {self.reference}\ntext: {self.text}\n"
                f"cpu: {cpu['machine']}, {' '.join(cpu['flags']) or 'no listed kernel flags'}\n")
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return f"{head}\n{format_table(self.agreement, self.thresholds)}\n\n{verdict} ({self.seconds:.1f} s)"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "encoding": self.encoding, "target": self.target,
                "kv_cache_strategy": self.kv_cache_strategy, "thresholds": self.threshold_class,
                "reference": self.reference, "text": self.text, **self.agreement.to_dict(),
                "passed": self.passed, "failures": self.failures, "seconds": self.seconds,
                "cpu": cpu_description()}


def cpu_description() -> dict[str, Any]:
    """The machine and the CPU features its quantized kernels depend on."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.partition(":")[2].split())
    except OSError:
        pass  # not Linux: the machine name alone
    return {"machine": platform.machine(), "flags": [f for f in KERNEL_CPU_FLAGS if f in flags]}


def shipped_text() -> str:
    return importlib.resources.files("ember.tools").joinpath("data", "verify_text.txt").read_text(encoding="utf-8")


def text_ids(tokenizer: Any, text: str, name: str, vocab_size: int, limit: int) -> tuple[list[int], str]:
    """At most ``limit`` token ids of ``text`` (called ``name``) and a phrase saying what they are; seeded
    random ids when the tokenizer turns the text into few distinct ids (the word-level tokenizers of tiny test
    models), so that the comparison still covers many different tokens."""
    ids = tokenizer.encode(text)
    distinct = len(set(ids))
    if distinct >= MIN_DISTINCT_IDS:
        return ids[:limit], f"{min(len(ids), limit)} tokens of {name}"
    count = min(RANDOM_TOKENS, limit)
    return (np.random.default_rng(0).integers(0, vocab_size, count).tolist(),
            f"{count} seeded random ids (the tokenizer makes only {distinct} distinct ids of {name})")


def teacher_forced_logits(pipeline: Any, ids: Sequence[int]) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` of every position: one prefill where the artifact returns every position's
    logits, else a one-token prefill and forced decode steps (the path generation takes)."""
    model = pipeline.pipeline_model
    every = model.return_logits is ReturnLogits.ALL
    ctx = pipeline.new_context(list(ids) if every else list(ids[:1]))
    try:
        inputs = model.prepare_initial_token_inputs([ctx])
        out = model.execute(inputs)
        if every:
            return out.logits[0, :len(ids)].copy()
        rows = [out.next_token_logits[0]]
        if not model.reserve(ctx, len(ids) - 1):
            raise ValueError(f"the KV cache has no room for {len(ids)} tokens")
        for token in ids[1:]:
            ctx.start_idx = ctx.active_idx
            ctx.tokens.append(int(token))
            inputs = model.prepare_next_token_inputs(np.array([token]), inputs)
            rows.append(model.execute(inputs).next_token_logits[0])
        return np.stack(rows)
    finally:
        model.release(ctx.request_id)


def _pipeline(model: str | Path, options: VerifyOptions, max_length: int) -> Any:
    return PIPELINE_REGISTRY.retrieve(_config(model, options, max_length), task=PipelineTask.TEXT_GENERATION)[1]


def _config(model: str | Path, options: VerifyOptions, max_length: int | None = None) -> PipelineConfig:
    return PipelineConfig(model_path=model, encoding=options.encoding, kv_cache_strategy=options.kv_cache_strategy,
                          target=options.target or "ort-cpu", device=options.device, max_length=max_length,
                          max_batch_size=1,
                          return_logits=ReturnLogits.ALL, num_threads=options.num_threads,
                          cache_dir=options.cache_dir, decode_slots=0)  # the named strategy's graph is verified


class _TransformersModel:
    """transformers' float32 model of a checkpoint, loaded once per process (a GGUF takes tens of seconds to
    dequantize); it remembers the logits of the last text it scored, which every encoding's run asks for."""

    def __init__(self, source: ModelSource):
        import torch
        import transformers

        kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "eager"}
        location = str(source.path.parent if source.kind == "gguf" else source.path)
        if source.kind == "gguf":
            kwargs["gguf_file"] = source.path.name
        self.model = transformers.AutoModelForCausalLM.from_pretrained(location, **kwargs).eval()
        self.description = (f"transformers {transformers.__version__} (float32, eager attention) on "
                            f"{source.path.name}")
        self._last: tuple[tuple[tuple[int, ...], ...], np.ndarray] | None = None

    def logits(self, rows: list[list[int]]) -> np.ndarray:
        import torch

        key = tuple(tuple(r) for r in rows)
        if self._last is None or self._last[0] != key:
            with torch.no_grad():
                self._last = key, self.model(torch.tensor(rows)).logits.float().numpy()
        return self._last[1]


@functools.lru_cache(maxsize=1)
def _transformers_model(path: Path, kind: str, sha256: str) -> _TransformersModel:
    return _TransformersModel(ModelSource(path, kind))


def transformers_reference(source: ModelSource, cache_dir: Path) -> Reference:
    model = _transformers_model(source.path, source.kind, source_sha256(source, cache_dir))
    return Reference(model.description, model.logits)


def ember_reference(source: ModelSource, options: VerifyOptions, max_length: int) -> Reference:
    float_options = VerifyOptions(model=source.path, encoding="float32", num_threads=options.num_threads,
                                  cache_dir=options.cache_dir)
    pipeline = _pipeline(source.path, float_options, max_length)
    return Reference(f"ember float32 (ort-cpu) built from {source.path.name}",
                     lambda rows: np.stack([teacher_forced_logits(pipeline, row) for row in rows]))


def choose_reference(source: ModelSource, options: VerifyOptions, max_length: int) -> Reference:
    """``transformers`` where torch is installed (``auto``), else ember's float32 build."""
    if options.reference not in REFERENCES:
        raise ValueError(f"unknown reference {options.reference!r}; choose {', '.join(REFERENCES)}")
    if options.reference == "ember":
        return ember_reference(source, options, max_length)
    missing = [m for m in ("torch", "transformers") + (("gguf",) if source.kind == "gguf" else ())
               if importlib.util.find_spec(m) is None]
    if missing and options.reference == "transformers":
        raise ValueError(f"the transformers reference needs {', '.join(missing)} (pip install 'ember[test]')")
    if not missing:
        try:
            return transformers_reference(source, Path(_config(source.path, options).cache_dir))
        except (OSError, ValueError, KeyError) as error:
            if options.reference == "transformers":
                raise ValueError(f"transformers cannot load {source.path}: {error}") from None
            logger.warning("transformers cannot load %s (%s); using ember's float32 build", source.path, error)
    return ember_reference(source, options, max_length)


def _reference_source(artifact: Artifact, cache_dir: Path) -> ModelSource:
    """The checkpoint an artifact was compiled from, checked to be the same bytes."""
    path = Path(artifact.manifest["source"]["path"])
    if not path.exists():
        raise ValueError(f"artifact {artifact.path} was compiled from {path}, which is gone; the reference "
                         f"needs the source weights")
    source = ModelSource.resolve(path)
    if source_sha256(source, cache_dir) != artifact.manifest["source"]["sha256"]:
        raise ValueError(f"{path} has changed since artifact {artifact.path} was compiled from it")
    return source


def _check_artifact_options(artifact: Artifact, options: VerifyOptions) -> None:
    """An artifact is what it was compiled as: options that ask for something else are an error."""
    asked = {"encoding": options.encoding, "kv_cache_strategy": options.kv_cache_strategy, "target": options.target}
    for key, value in asked.items():
        if value is not None and str(getattr(value, "value", value)) != artifact.manifest[key]:
            raise ValueError(f"artifact {artifact.path} has {key} {artifact.manifest[key]}, not {value}")


def _prompts(ids: list[int], workload: Workload) -> list[list[int]]:
    """Greedy prompts: ``workload.prompts`` windows of the text, evenly spread."""
    size = min(workload.prompt_tokens, len(ids))
    starts = np.linspace(0, len(ids) - size, workload.prompts).astype(int)
    return [ids[s:s + size] for s in dict.fromkeys(starts.tolist())]


def verify_model(options: VerifyOptions) -> VerifyReport:
    """Run the comparison ``options`` describe; the report says whether it passes its thresholds."""
    start = time.perf_counter()
    name = "the shipped text" if options.text is None else str(options.text)
    text = shipped_text() if options.text is None else options.text.read_text(encoding="utf-8")
    source = ModelSource.resolve(options.model)
    architecture = PIPELINE_REGISTRY.retrieve_architecture(source.path)
    if architecture is None:
        raise ValueError(f"the architecture of {source.path} is not supported; supported: "
                         f"{', '.join(PIPELINE_REGISTRY.supported_names())}")
    if architecture.task is not PipelineTask.TEXT_GENERATION:
        raise ValueError(f"ember verify compares text-generation models; {source.path.name} serves "
                         f"{architecture.task.value} (encoders' w8a8 against float32: `ember bench --embeddings`)")
    if source.kind == "artifact":
        given = verify_artifact(source.path)
        _check_artifact_options(given, options)
        encoding = given.manifest["encoding"]
    else:
        encoding = resolve_encoding(_config(source.path, options), architecture, source)
    threshold_class, thresholds = thresholds_for(encoding)  # before any compile: an encoding without limits
    workload = options.workload
    hf_config = PIPELINE_REGISTRY.get_active_huggingface_config(source.path)
    model_max = upper_bounded_default(hf_config.max_position_embeddings, options.max_length)
    tokenizer = PIPELINE_REGISTRY.retrieve_tokenizer(_config(source.path, options))
    ids, what = text_ids(tokenizer, text, name, hf_config.vocab_size, min(workload.tokens or MAX_TOKENS, model_max - 1))
    if len(ids) < 2:
        raise ValueError(f"{name} is shorter than two tokens")
    prompts = _prompts(ids, workload)
    max_length = min(model_max, max(len(ids), len(prompts[0]) + workload.new_tokens) + 1)

    pipeline = _pipeline(source.path, options, max_length)
    artifact = pipeline.pipeline_model.artifact
    cache_dir = Path(pipeline.pipeline_config.cache_dir)
    reference_source = _reference_source(artifact, cache_dir) if source.kind == "artifact" else source
    reference = choose_reference(reference_source, options, max_length)

    ours = teacher_forced_logits(pipeline, ids)
    expected = reference.logits([ids])[0]
    if expected.shape != ours.shape:
        raise ValueError(f"the reference's logits have shape {expected.shape}, ember's {ours.shape}")
    sampling = SamplingParams(max_new_tokens=workload.new_tokens, ignore_eos=True)
    generated = [pipeline.generate_tokens([prompt], sampling)[0] for prompt in prompts]  # one at a time, as generate
    scored = reference.logits([p + g for p, g in zip(prompts, generated)])
    greedy = [greedy_agreement(g, s, len(p)) for p, g, s in zip(prompts, generated, scored)]
    agreement = teacher_forced_agreement(ours, expected, ids, greedy)
    text_line = (f"{what}, teacher-forced; greedy: {len(prompts)} prompts of {len(prompts[0])} tokens "
                 f"x {max(map(len, generated))} new")
    return VerifyReport(model=source.path.name, encoding=artifact.manifest["encoding"],
                        target=artifact.manifest["target"], kv_cache_strategy=artifact.manifest["kv_cache_strategy"],
                        threshold_class=threshold_class, thresholds=thresholds, reference=reference.description,
                        text=text_line, agreement=agreement, seconds=time.perf_counter() - start,
                        failures=thresholds.failures(agreement))


def needs_verification(manifest: dict[str, Any]) -> bool:
    """Whether ``ember compile`` runs the short form on an artifact: a quantized text-generation model whose
    manifest has no figures yet (float32 is the reference itself; encoders are not verified here)."""
    encoding = manifest.get("encoding")
    return (manifest.get("task") == PipelineTask.TEXT_GENERATION.value and encoding != "float32"
            and encoding in ENCODING_CLASSES and "verification" not in manifest)


def record_verification(artifact_dir: Path, *, cache_dir: Path | None = None,
                        num_threads: int | None = None) -> dict[str, Any]:
    """Run the short form on an artifact against ember's float32 build of its source (deployment machines have
    no torch) and write the figures into its manifest under ``verification``; returns them."""
    import onnxruntime

    report = verify_model(VerifyOptions(model=artifact_dir, reference="ember", workload=SHORT, cache_dir=cache_dir,
                                        num_threads=num_threads))
    figures = {"form": "short", "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "onnxruntime": onnxruntime.__version__, **report.to_dict()}
    update_manifest(artifact_dir, {"verification": figures})
    logger.info("%s: accuracy %s", artifact_dir, "passes" if report.passed else "; ".join(report.failures))
    return figures
