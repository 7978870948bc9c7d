"""The architecture registry (``max.pipelines.lib.registry``): which models ember runs, and how.

A :class:`SupportedArchitecture` names a Hugging Face class (``config.json``'s ``architectures``), its
task, encodings (each with the KV cache strategies it supports), the ``PipelineModel`` that serves it and
the graph builder in ``ember.graphs.architectures``. :data:`PIPELINE_REGISTRY` holds the built-in ones
(the table is in :mod:`.architectures`).

The registry resolves a :class:`PipelineConfig` once, at the boundary, into a :class:`ResolvedModel` (source,
architecture, configuration with the architecture's required arguments, verified artifact and its config) and
hands that to the pipeline model, whose constructor neither compiles nor probes files. Where the artifact comes
from is the registry's ``artifacts`` provider: :func:`load_compiled_artifact` (an artifact given as the model)
by default; compile on first use (``ember.runtime.compile_cache.ensure_artifact``) for ``PIPELINE_REGISTRY``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from ember.compiler.artifact import Artifact, verify_artifact
from ember.graphs.nn.kv_cache import DEFAULT_PAGE_SIZE, KVCacheStrategy
from ember.graphs.nn.transformer import ReturnLogits

from ..backends import BACKENDS, RuntimeBackend, runtime_of
from ..session import InferenceSession, parse_device
from .config import PipelineConfig
from .decode_slots import slot_branch
from .embeddings import EmbeddingsPipeline
from .model_source import ModelSource
from .supported_architecture import (PipelineTask, ResolvedArtifact, ResolvedModel, RopeType,  # noqa: F401 (API)
                                     SupportedArchitecture)
from .text_generation import TextGenerationPipeline
from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)


#: Where a registry's artifacts come from: ``(configuration, architecture, source) -> ResolvedArtifact``.
ArtifactProvider = Callable[[PipelineConfig, SupportedArchitecture, ModelSource], ResolvedArtifact]


def load_compiled_artifact(pipeline_config: PipelineConfig, architecture: SupportedArchitecture,
                           source: ModelSource) -> ResolvedArtifact:
    """The artifact provider of a registry that does not compile: the model must be a compiled artifact."""
    if source.kind != "artifact":
        raise ValueError(f"{source.path} is not a compiled ember artifact and this registry does not compile; "
                         f"compile it with `ember compile`, or use PIPELINE_REGISTRY (compiles on first use)")
    start = time.perf_counter()
    artifact = verify_artifact(source.path)
    check_asked_of_artifact(pipeline_config, artifact)
    return ResolvedArtifact(artifact, False, time.perf_counter() - start)


def check_asked_of_artifact(pipeline_config: PipelineConfig, artifact: Artifact) -> None:
    """A compiled artifact is what it was compiled as: options that would change the compile (encoding, KV cache
    strategy and bit width, page size, target) and differ from its manifest are an error, not silently ignored.
    Options left at their defaults ask nothing."""
    manifest, options = artifact.manifest, artifact.manifest.get("options", {})
    asked = {"encoding": pipeline_config.encoding, "kv_cache_strategy": pipeline_config.kv_cache_strategy,
             "kv_cache_bit_width": pipeline_config.kv_cache_bit_width or None}
    if pipeline_config.kv_cache_page_size != DEFAULT_PAGE_SIZE:  # the default: whatever the artifact has
        asked["kv_cache_page_size"] = pipeline_config.kv_cache_page_size
    if pipeline_config.target != "ort-cpu":  # the default: any artifact's target is fine when none is asked
        asked["target"] = pipeline_config.target
    if pipeline_config.tensor_parallel != 1:  # the default: an artifact runs over the ranks it was split for
        asked["tensor_parallel"] = pipeline_config.tensor_parallel
    has = {"encoding": manifest.get("encoding"), "kv_cache_strategy": manifest.get("kv_cache_strategy"),
           "kv_cache_bit_width": options.get("kv_cache_bit_width", 0),
           "kv_cache_page_size": options.get("kv_cache_page_size"), "target": manifest.get("target"),
           "tensor_parallel": artifact.world_size}
    for name, value in asked.items():
        value = getattr(value, "value", value)
        if value is not None and value != has[name]:
            raise ValueError(f"{artifact.path} was compiled with {name} {has[name]!r}, not the {value!r} asked for; "
                             f"compile the source model with that option instead (`ember compile ... `)")


def _key(huggingface_repo: Any) -> str:
    return str(ModelSource.resolve(huggingface_repo).path)


class PipelineRegistry:
    """The set of supported architectures, with per-model caches of configs and tokenizers.

    ``artifacts`` provides each resolved model's artifact (see the module docstring); ``backends`` is the table of
    runtime backends its sessions may load artifacts with (``ember.runtime.backends.BACKENDS`` by default)."""

    def __init__(self, architectures: Iterable[SupportedArchitecture] = (),
                 artifacts: ArtifactProvider = load_compiled_artifact,
                 backends: dict[str, type[RuntimeBackend]] = BACKENDS):
        self.architectures: dict[str, SupportedArchitecture] = {}
        self.artifacts = artifacts
        self.backends = backends
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
        return self.architecture_for(ModelSource.resolve(huggingface_repo))

    def architecture_for(self, source: ModelSource) -> SupportedArchitecture | None:
        """The entry for a resolved source, or None."""
        name = source.architecture_name()
        return self.architectures.get(name) if name else None

    def _architecture_of(self, source: ModelSource, override_architecture: str | None = None,
                         task: PipelineTask | None = None) -> SupportedArchitecture:
        name = override_architecture or source.architecture_name()
        if name not in self.architectures:
            what = "architecture" if override_architecture else f"architecture of {source.path}"
            raise ValueError(f"{what} {name!r} is not supported; supported: {', '.join(self.supported_names())}")
        architecture = self.architectures[name]
        if task is not None and architecture.task != task:
            raise ValueError(f"{architecture.name} serves {architecture.task.value}, not {PipelineTask(task).value}")
        return architecture

    def retrieve_pipeline_task(self, pipeline_config: PipelineConfig) -> PipelineTask:
        return self._architecture_of(ModelSource.resolve(pipeline_config.model_path)).task

    def resolve(self, pipeline_config: PipelineConfig, task: PipelineTask | None = None,
                override_architecture: str | None = None, source: ModelSource | None = None) -> ResolvedModel:
        """The configuration resolved once: source (``source``: already resolved from ``model_path``),
        architecture, required arguments applied, artifact (from the registry's provider: compiled now if it
        compiles and the cache has none)."""
        source = source or ModelSource.resolve(pipeline_config.model_path)
        return self._resolve(pipeline_config, source, self._architecture_of(source, override_architecture, task))

    def _resolve(self, pipeline_config: PipelineConfig, source: ModelSource,
                 architecture: SupportedArchitecture) -> ResolvedModel:
        config = architecture.apply_required_arguments(pipeline_config)
        resolved = self.artifacts(config, architecture, source)
        return ResolvedModel(config, source, architecture, resolved.artifact, resolved.artifact.hf_config,
                             resolved.compiled, resolved.seconds)

    def get_active_huggingface_config(self, huggingface_repo: Any) -> Any:
        key = _key(huggingface_repo)
        if key not in self._configs:
            self._configs[key] = ModelSource.resolve(huggingface_repo).hf_config()
        return self._configs[key]

    def _tokenizer_for(self, huggingface_repo: Any, pipeline_config: PipelineConfig | None = None) -> Any:
        """The tokenizer of a model: an artifact's own, a Hugging Face folder's, or (for a GGUF) the one its
        artifact carries (from the registry's provider: compiled if it compiles; no session is created)."""
        source = ModelSource.resolve(huggingface_repo)
        if source.kind == "artifact":  # verified first: the tokenizer's loader reads whatever its folder holds
            return TextTokenizer(verify_artifact(source.path).tokenizer_dir)
        if source.kind == "hf" and (source.path / "tokenizer.json").is_file():
            return TextTokenizer(source.path)
        config = pipeline_config or PipelineConfig(model_path=huggingface_repo)
        architecture = self._architecture_of(source)
        return TextTokenizer(self.artifacts(config, architecture, source).artifact.tokenizer_dir)

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
        """``(tokenizer_factory, pipeline_factory)``: the model's source and architecture are resolved now (a bad
        model fails here); nothing is compiled or loaded until a factory is called."""
        source = ModelSource.resolve(pipeline_config.model_path)
        architecture = self._architecture_of(source, override_architecture, task)

        def pipeline_factory():
            return self.build_pipeline(self._resolve(pipeline_config, source, architecture))

        def tokenizer_factory():
            return self.retrieve_tokenizer(pipeline_config, override_architecture)

        return tokenizer_factory, pipeline_factory

    def build_pipeline(self, model: ResolvedModel) -> Any:
        """The pipeline of a resolved model: its pipeline model (:meth:`_pipeline_model`), tokenizer and pipeline
        class (with the draft model of speculative decoding)."""
        architecture, config = model.architecture, model.pipeline_config
        pipeline_model = self._pipeline_model(model)
        refusal = self._decode_slots_refusal(model) if config.decode_slots else None
        if refusal is not None:  # asked for: an error; automatic: off
            if not config.decode_slots_auto:
                raise ValueError(refusal)
            logger.info("decode slots off: %s", refusal)
        elif config.decode_slots:
            pipeline_model.attach_decode_slots(self._decode_slot_model(model, pipeline_model))
        tokenizer = architecture.tokenizer(model.artifact.tokenizer_dir)
        extra = ({"context_validators": architecture.context_validators}
                 if architecture.task is PipelineTask.TEXT_GENERATION else {})
        if config.speculative is not None:
            if architecture.task is not PipelineTask.TEXT_GENERATION:
                raise ValueError(f"speculative decoding is for text generation; {architecture.name} serves "
                                 f"{architecture.task.value}")
            if config.draft_model_path is not None:
                extra["draft_model"] = self._draft_model(config, pipeline_model.max_seq_len)
        pipeline_class = get_pipeline_for_task(architecture.task, config)
        return pipeline_class(config, pipeline_model, tokenizer.eos_token_ids, tokenizer=tokenizer, **extra)

    def _draft_model(self, config: PipelineConfig, max_length: int) -> Any:
        """The draft decoder of speculative decoding: compiled like the target (target, device, encoding, threads),
        a paged cache as long as the target's, prefix caching off (its rejected proposals are truncated away)."""
        draft_config = dataclasses.replace(
            config, model_path=config.draft_model_path, draft_model_path=None, speculative=None,
            return_logits=ReturnLogits.LAST_TOKEN, max_length=max_length, enable_prefix_caching=False,
            kv_cache_bytes=None, kv_cache_pages=None)
        source = ModelSource.resolve(draft_config.model_path)
        architecture = self._architecture_of(source, None, PipelineTask.TEXT_GENERATION)
        return self._pipeline_model(self._resolve(draft_config, source, architecture))

    @staticmethod
    def _decode_slots_refusal(model: ResolvedModel) -> str | None:
        """Why this model cannot have decode slots (None: it can): not a text-generation model, or an artifact
        without the slots' graph. Asked-for slots fail with it; automatic ones stay off. (A slot always fits the
        KV cache budget: the paged model's ``max_length`` is already capped to what it holds of one sequence.)"""
        architecture = model.architecture
        if architecture.task is not PipelineTask.TEXT_GENERATION:
            return f"decode slots are for text generation; {architecture.name} serves {architecture.task.value}"
        if model.artifact.slot_graph_view() is None:
            return (f"decode slots run the continuous graph compiled into the paged artifact; {model.artifact.path} "
                    f"has none: pass the source model (HF folder or GGUF) with decode slots, or an artifact "
                    f"compiled with them")
        return None

    def _decode_slot_model(self, model: ResolvedModel, paged: Any) -> Any:
        """The decoder that runs decode slots: the continuous graph compiled into the paged artifact
        (``compiler/slot_graph.py``), on a second binding of the paged decoder's loaded model, a slot of its
        ``max_length`` per decode slot (runtime/kv_cache/slot_mirror.py)."""
        config = model.pipeline_config
        slot_artifact = model.artifact.slot_graph_view()
        assert slot_artifact is not None  # _decode_slots_refusal
        slot_config = dataclasses.replace(
            config, kv_cache_strategy=KVCacheStrategy.CONTINUOUS, decode_slots=0, max_batch_size=config.decode_slots,
            max_length=paged.max_seq_len, return_logits=ReturnLogits.LAST_TOKEN, kv_cache_pages=None)
        model_class: Any = model.architecture.pipeline_model
        return model_class(slot_config, paged.session, resolved=dataclasses.replace(model, artifact=slot_artifact),
                           loaded=slot_branch(paged.model, model.artifact.manifest))

    def _pipeline_model(self, model: ResolvedModel) -> Any:
        """The resolved model's pipeline model, in a session on the configured device (else device 0 of the kind
        the artifact was compiled for)."""
        config = model.pipeline_config
        device = parse_device(config.device or runtime_of(model.artifact.manifest).get("device_kind", "cpu"))
        session = InferenceSession([device], num_threads=config.num_threads, backends=self.backends)
        # ember's pipeline models take the resolved model besides MAX's arguments (PipelineModel's own do not)
        model_class: Any = model.architecture.pipeline_model
        return model_class(config, session, resolved=model)

    def retrieve(self, pipeline_config: PipelineConfig, task: PipelineTask | None = None,
                 override_architecture: str | None = None) -> tuple[Any, Any]:
        """``(tokenizer, pipeline)``, the artifact from the registry's provider (compiled on first use for
        ``PIPELINE_REGISTRY``)."""
        _, factory = self.retrieve_factory(pipeline_config, task, override_architecture)
        pipeline = factory()
        return pipeline.tokenizer, pipeline

    def reset(self) -> None:
        self.architectures.clear()
        self._configs.clear()
        self._tokenizers.clear()


def get_pipeline_for_task(task: PipelineTask, pipeline_config: PipelineConfig | None = None) -> type:
    """The pipeline class that serves a task."""
    pipelines = {PipelineTask.TEXT_GENERATION: TextGenerationPipeline,
                 PipelineTask.EMBEDDINGS_GENERATION: EmbeddingsPipeline}
    task = PipelineTask(task)
    if task not in pipelines:
        raise ValueError(f"no pipeline for task {task.value}; available: {', '.join(t.value for t in pipelines)}")
    return pipelines[task]
