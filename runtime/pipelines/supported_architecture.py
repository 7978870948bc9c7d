"""What the registry is made of and hands out: :class:`SupportedArchitecture` (one architecture ember serves) and
:class:`ResolvedModel` (a configuration resolved once), with the enums they use.

A leaf of the pipeline package: pipeline models take a ``ResolvedModel`` without importing the registry, which
imports the pipelines it builds.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ember.compiler.artifact import Artifact
from ember.graphs.architectures.spec import ArchitectureSpec, WeightRules
from ember.graphs.nn.kv_cache import KVCacheStrategy

from .config import PipelineConfig, SupportedEncoding, WeightsFormat
from .interfaces import PipelineModel
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
    pipeline_model: type[PipelineModel]
    task: PipelineTask
    tokenizer: type
    default_weights_format: WeightsFormat
    rope_type: RopeType = RopeType.none
    # Per weights format, the rules that rename a checkpoint's tensors (``(arch_config, checkpoint) -> rules``);
    # empty: the spec's own. The compile uses these, so an entry can override how a checkpoint is read.
    weight_adapters: dict[WeightsFormat, WeightRules] = field(default_factory=dict)
    multi_gpu_supported: bool = False
    required_arguments: dict[str, Any] = field(default_factory=dict)
    context_validators: list[Callable[[Any], None]] = field(default_factory=list)
    # Every fact about the architecture (config, KV parameters, limits, weight bytes and rules, graph builder).
    spec: ArchitectureSpec = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.name not in self.spec.hf_architectures:
            raise ValueError(f"{self.name}: spec {self.spec.name!r} does not build it "
                             f"(it builds {', '.join(self.spec.hf_architectures)})")
        if not self.weight_adapters:
            self.weight_adapters = {WeightsFormat(f): rules for f, rules in self.spec.weight_rules.items()}
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


@dataclass(frozen=True)
class ResolvedArtifact:
    """A verified artifact, whether it was compiled now, and the seconds that took (the compile, or the
    verification of a cached or given artifact)."""

    artifact: Artifact
    compiled: bool
    seconds: float


@dataclass(frozen=True)
class ResolvedModel:
    """A configuration resolved once (see the module docstring): everything a pipeline model is built from.

    ``huggingface_config`` is the artifact's own ``config.json`` as plain data (running a model needs neither
    transformers nor the source checkpoint)."""

    pipeline_config: PipelineConfig
    source: ModelSource
    architecture: SupportedArchitecture
    artifact: Artifact
    huggingface_config: dict[str, Any]
    compiled: bool
    seconds: float

    @property
    def manifest(self) -> dict[str, Any]:
        return self.artifact.manifest
