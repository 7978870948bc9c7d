"""Loading a text-generation pipeline for a command: the configuration and how long each part took."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineConfig

logger = logging.getLogger(__name__)


@dataclass
class LoadedPipeline:
    """A ready pipeline, its tokenizer, and where its setup time went."""

    tokenizer: Any
    pipeline: Any
    seconds: float  # wall time of the whole setup (artifact, session, tokenizer, KV cache)
    compiled: bool  # True when the artifact was compiled now, False when loaded (cache or a given artifact)
    artifact_seconds: float  # compile time when compiled, verification time when loaded
    session_seconds: float  # onnxruntime session creation
    artifact_path: Path
    from_cache: bool  # the artifact came from the compile cache (not given on the command line)

    @property
    def num_threads(self) -> int:
        return self.pipeline.pipeline_model.session.num_threads

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


def load_pipeline(config: PipelineConfig) -> LoadedPipeline:
    """Compile (on first use) or load the model and build its text-generation pipeline."""
    from ember.runtime.pipelines import ModelSource, PipelineTask

    source = ModelSource.resolve(config.model_path)
    start = time.perf_counter()
    tokenizer, pipeline = PIPELINE_REGISTRY.retrieve(config, task=PipelineTask.TEXT_GENERATION)
    seconds = time.perf_counter() - start
    model = pipeline.pipeline_model
    loaded = LoadedPipeline(tokenizer=tokenizer, pipeline=pipeline, seconds=seconds,
                            compiled=model.resolved.compiled, artifact_seconds=model.resolved.seconds,
                            session_seconds=model.model.load_seconds, artifact_path=Path(model.artifact.path),
                            from_cache=source.kind != "artifact")
    logger.info("%s: %s", loaded.artifact_path, loaded.describe())
    return loaded
