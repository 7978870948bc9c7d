"""The architecture registry (``max.pipelines.lib.registry``): which models ember runs, and how.

A :class:`SupportedArchitecture` names a Hugging Face class (``config.json``'s ``architectures``), its
task, encodings (each with the KV cache strategies it supports), the ``PipelineModel`` that serves it and
the graph builder in ``ember.graphs.architectures``. :data:`PIPELINE_REGISTRY` holds the built-in ones
(the table is in :mod:`.architectures`).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ember.graphs.nn.kv_cache import KVCacheStrategy

from .config import PipelineConfig, SupportedEncoding, WeightsFormat
from .model_source import ModelSource

logger = logging.getLogger(__name__)


class PipelineTask(str, enum.Enum):
    TEXT_GENERATION = "text_generation"
    EMBEDDINGS_GENERATION = "embeddings_generation"
    SPECULATIVE_DECODING = "speculative_decoding"
    AUDIO_GENERATION = "audio_generation"
    SPEECH_TOKEN_GENERATION = "speech_token_generation"


class RopeType(str, enum.Enum):
    none = "none"
    normal = "normal"
    neox = "neox"


@dataclass
class SupportedArchitecture:
    """One architecture ember can compile and serve."""

    name: str
    example_repo_ids: list[str]
    default_encoding: SupportedEncoding
    supported_encodings: dict[SupportedEncoding, list[KVCacheStrategy]]
    pipeline_model: type
    task: PipelineTask
    tokenizer: type
    default_weights_format: WeightsFormat
    rope_type: RopeType = RopeType.none
    weight_adapters: dict[WeightsFormat, Any] = field(default_factory=dict)
    multi_gpu_supported: bool = False
    required_arguments: dict[str, Any] = field(default_factory=dict)
    context_validators: list[Callable[[Any], None]] = field(default_factory=list)
    graph_builder: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.default_encoding not in self.supported_encodings:
            raise ValueError(f"{self.name}: default encoding {self.default_encoding} is not among its supported ones")
        unknown = sorted(set(self.required_arguments) - {f.name for f in dataclasses.fields(PipelineConfig)})
        if unknown:
            raise ValueError(f"{self.name}: required_arguments names no PipelineConfig field: {', '.join(unknown)}")

    @property
    def tokenizer_cls(self) -> type:
        """The tokenizer class (MAX's name for :attr:`tokenizer`)."""
        return self.tokenizer

    def apply_required_arguments(self, pipeline_config: PipelineConfig) -> PipelineConfig:
        """``pipeline_config`` with this architecture's ``required_arguments`` set (MAX: values the architecture
        needs whatever the user asked; each override is logged)."""
        changed = {k: v for k, v in self.required_arguments.items() if getattr(pipeline_config, k) != v}
        for key, value in changed.items():
            logger.info("%s requires %s=%r (was %r)", self.name, key, value, getattr(pipeline_config, key))
        return dataclasses.replace(pipeline_config, **changed) if changed else pipeline_config


def _key(huggingface_repo: Any) -> str:
    return str(ModelSource.resolve(huggingface_repo).path)


class PipelineRegistry:
    """The set of supported architectures, with per-model caches of configs and tokenizers."""

    def __init__(self, architectures: Iterable[SupportedArchitecture] = ()):
        self.architectures: dict[str, SupportedArchitecture] = {}
        self._configs: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        for architecture in architectures:
            self.register(architecture)

    def register(self, architecture: SupportedArchitecture, *, allow_override: bool = False) -> None:
        if architecture.name in self.architectures and not allow_override:
            raise ValueError(f"architecture {architecture.name} is already registered "
                             f"(pass allow_override=True to replace it)")
        self.architectures[architecture.name] = architecture

    def supported_names(self) -> list[str]:
        return sorted(self.architectures)

    def retrieve_architecture(self, huggingface_repo: Any) -> SupportedArchitecture | None:
        """The entry for a model (directory, GGUF file or artifact), or None."""
        name = ModelSource.resolve(huggingface_repo).architecture_name()
        return self.architectures.get(name) if name else None

    def _require(self, pipeline_config: PipelineConfig) -> SupportedArchitecture:
        source = ModelSource.resolve(pipeline_config.model_path)
        name = source.architecture_name()
        if name not in self.architectures:
            raise ValueError(f"architecture {name!r} of {source.path} is not supported; supported: "
                             f"{', '.join(self.supported_names())}")
        return self.architectures[name]

    def retrieve_pipeline_task(self, pipeline_config: PipelineConfig) -> PipelineTask:
        return self._require(pipeline_config).task

    def get_active_huggingface_config(self, huggingface_repo: Any) -> Any:
        key = _key(huggingface_repo)
        if key not in self._configs:
            self._configs[key] = ModelSource.resolve(huggingface_repo).hf_config()
        return self._configs[key]

    def _tokenizer_for(self, huggingface_repo: Any, pipeline_config: PipelineConfig | None = None) -> Any:
        """The tokenizer of a model: an artifact's own, a Hugging Face folder's, or (for a GGUF) the one its
        compiled artifact carries (compiling it if the cache has none; no session is created)."""
        from .artifact_cache import ensure_artifact
        from .tokenizer import TextTokenizer

        source = ModelSource.resolve(huggingface_repo)
        if source.kind == "artifact":
            return TextTokenizer(source.path / "tokenizer")
        if source.kind == "hf" and (source.path / "tokenizer.json").is_file():
            return TextTokenizer(source.path)
        config = pipeline_config or PipelineConfig(model_path=huggingface_repo)
        architecture = self._require(config)
        return TextTokenizer(ensure_artifact(config, architecture, source).artifact.tokenizer_dir)

    def get_active_tokenizer(self, huggingface_repo: Any) -> Any:
        """The model's tokenizer, loaded once per model."""
        key = _key(huggingface_repo)
        if key not in self._tokenizers:
            self._tokenizers[key] = self._tokenizer_for(huggingface_repo)
        return self._tokenizers[key]

    def retrieve_tokenizer(self, pipeline_config: PipelineConfig, override_architecture: str | None = None) -> Any:
        """The configured model's tokenizer (without loading the model)."""
        if override_architecture is not None and override_architecture not in self.architectures:
            raise ValueError(f"architecture {override_architecture!r} is not supported; supported: "
                             f"{', '.join(self.supported_names())}")
        return self._tokenizer_for(pipeline_config.model_path, pipeline_config)

    def retrieve_factory(self, pipeline_config: PipelineConfig, task: PipelineTask | None = None,
                         override_architecture: str | None = None) -> tuple[Any, Callable[[], Any]]:
        """``(tokenizer_factory, pipeline_factory)``: nothing is compiled or loaded until called."""
        architecture = (self.architectures[override_architecture] if override_architecture
                        else self._require(pipeline_config))
        if task is not None and architecture.task != task:
            raise ValueError(f"{architecture.name} serves {architecture.task.value}, not {PipelineTask(task).value}")

        def pipeline_factory():
            from ..session import InferenceSession
            config = architecture.apply_required_arguments(pipeline_config)
            session = InferenceSession(num_threads=config.num_threads)
            model = architecture.pipeline_model(config, session, architecture=architecture)
            pipeline_class = get_pipeline_for_task(architecture.task, config)
            tokenizer = architecture.tokenizer(model.artifact.tokenizer_dir)
            extra = ({"context_validators": architecture.context_validators}
                     if architecture.task is PipelineTask.TEXT_GENERATION else {})
            return pipeline_class(config, model, tokenizer.eos_token_ids, tokenizer=tokenizer, **extra)

        def tokenizer_factory():
            return self.retrieve_tokenizer(pipeline_config, override_architecture)

        return tokenizer_factory, pipeline_factory

    def retrieve(self, pipeline_config: PipelineConfig, task: PipelineTask | None = None,
                 override_architecture: str | None = None) -> tuple[Any, Any]:
        """``(tokenizer, pipeline)``, compiling the model on first use."""
        _, factory = self.retrieve_factory(pipeline_config, task, override_architecture)
        pipeline = factory()
        return pipeline.tokenizer, pipeline

    def reset(self) -> None:
        self.architectures.clear()
        self._configs.clear()
        self._tokenizers.clear()


def get_pipeline_for_task(task: PipelineTask, pipeline_config: PipelineConfig | None = None) -> type:
    """The pipeline class that serves a task."""
    from .embeddings import EmbeddingsPipeline
    from .text_generation import TextGenerationPipeline

    pipelines = {PipelineTask.TEXT_GENERATION: TextGenerationPipeline,
                 PipelineTask.EMBEDDINGS_GENERATION: EmbeddingsPipeline}
    task = PipelineTask(task)
    if task not in pipelines:
        raise ValueError(f"no pipeline for task {task.value}; available: {', '.join(t.value for t in pipelines)}")
    return pipelines[task]
