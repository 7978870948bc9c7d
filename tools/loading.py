"""Loading a pipeline for a command (text generation or embeddings): the configuration, which task a model
serves, and how long each part of the setup took."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.runtime.pipelines import PIPELINE_REGISTRY, ModelSource, PipelineConfig, PipelineTask

logger = logging.getLogger(__name__)

_COMMAND_FOR_TASK = {PipelineTask.TEXT_GENERATION: "ember generate", PipelineTask.EMBEDDINGS_GENERATION: "ember embed"}


@dataclass
class LoadedPipeline:
    """A ready pipeline (text generation or embeddings), its tokenizer, and where its setup time went."""

    tokenizer: Any
    pipeline: Any
    seconds: float  # wall time of the whole setup (artifact, session, tokenizer, KV cache, warm-up)
    compiled: bool  # True when the artifact was compiled now, False when loaded (cache or a given artifact)
    artifact_seconds: float  # compile time when compiled, verification time when loaded
    session_seconds: float  # onnxruntime session creation
    artifact_path: Path
    from_cache: bool  # the artifact came from the compile cache (not given on the command line)
    task: PipelineTask = PipelineTask.TEXT_GENERATION

    @property
    def num_threads(self) -> int:
        return self.pipeline.pipeline_model.session.num_threads

    def describe_verification(self) -> str:
        """The accuracy figures ``ember compile`` recorded in the artifact's manifest (the short form of
        ``ember verify``), in one line; "not measured" when it has none."""
        from .verify_metrics import summarize

        return summarize(self.pipeline.pipeline_model.artifact.manifest.get("verification"))

    def describe(self) -> str:
        """One phrase saying how the artifact was obtained and what it cost."""
        if self.compiled:
            return (f"compiled in {self.artifact_seconds:.2f} s (session {self.session_seconds:.2f} s, "
                    f"setup {self.seconds:.2f} s)")
        what = "loaded cached artifact" if self.from_cache else "loaded artifact"
        warm_up = getattr(self.pipeline.pipeline_model, "warm_up_seconds", 0.0)
        return (f"{what} in {self.seconds:.2f} s (verify {self.artifact_seconds:.2f} s, "
                f"session {self.session_seconds:.2f} s, warm-up {warm_up:.2f} s)")


def pipeline_config(model: str | Path | None, *, encoding: str | None = None, max_length: int | None = None,
                    num_threads: int | None = None, max_batch_size: int = 1, **extra: Any) -> PipelineConfig:
    """The configuration the commands use: one request at a time unless told otherwise."""
    return PipelineConfig(model_path=model, encoding=encoding, max_length=max_length, num_threads=num_threads,
                          max_batch_size=max_batch_size, **extra)


def embeddings_model(model: str | Path | None) -> str | Path:
    """The model an embeddings command runs: the one given, or the embedded all-MiniLM-L6-v2."""
    from ember.runtime.pipelines import default_embeddings_model_path

    return default_embeddings_model_path() if model is None else model


def model_task(model: str | Path | None) -> PipelineTask | None:
    """The task the registry says a model serves (None for an unsupported architecture). Reads only the
    model's config.json, manifest or GGUF header; nothing is compiled or loaded."""
    return _task_of(ModelSource.resolve(model))


def _task_of(source: ModelSource) -> PipelineTask | None:
    architecture = PIPELINE_REGISTRY.architecture_for(source)
    return None if architecture is None else PipelineTask(architecture.task)


def _check_task(source: ModelSource, task: PipelineTask) -> None:
    """A clear error when a command is given a model of the other kind (e.g. ``ember generate`` on an encoder)."""
    served = _task_of(source)
    if served is None or served == task:
        return  # unsupported architectures get the registry's own error, naming the supported ones
    hint = _COMMAND_FOR_TASK.get(served)
    raise ValueError(f"{source.path} serves {served.value}, not {task.value}" + (f"; use `{hint}`" if hint else ""))


def load_pipeline(config: PipelineConfig, task: PipelineTask | str = PipelineTask.TEXT_GENERATION) -> LoadedPipeline:
    """Compile (on first use) or load the model and build its pipeline for ``task``: a text-generation
    pipeline, or an ``EmbeddingsPipeline`` for ``PipelineTask.EMBEDDINGS_GENERATION``. The model is resolved
    once (``PIPELINE_REGISTRY.resolve``) and the pipeline built from that."""
    task = PipelineTask(task)
    source = ModelSource.resolve(config.model_path)
    _check_task(source, task)
    start = time.perf_counter()
    resolved = PIPELINE_REGISTRY.resolve(config, task=task, source=source)
    pipeline = PIPELINE_REGISTRY.build_pipeline(resolved)
    seconds = time.perf_counter() - start
    model = pipeline.pipeline_model
    loaded = LoadedPipeline(tokenizer=pipeline.tokenizer, pipeline=pipeline, seconds=seconds,
                            compiled=resolved.compiled, artifact_seconds=resolved.seconds,
                            session_seconds=model.model.load_seconds, artifact_path=Path(resolved.artifact.path),
                            from_cache=source.kind != "artifact", task=task)
    logger.info("%s: %s", loaded.artifact_path, loaded.describe())
    return loaded
