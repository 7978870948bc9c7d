"""Compile on first use, load from the cache after: the compile cache keyed by source, options and versions.

This module sits above the pipeline layer (it imports the compiler; nothing in ``pipelines/`` imports it): the
registry that compiles on first use (``PIPELINE_REGISTRY``) is given :func:`ensure_artifact` as its artifact
provider, and pipeline models receive the artifact already resolved.

The key is computed from the source's bytes (sha256, remembered by the files' stat: ``compiler/hashing.py``) and
the options the user gave, so a cached artifact is found without opening the checkpoint. An artifact whose files
no longer match its manifest is reported and recompiled in place, under the artifact's cross-process lock.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ember.compiler import ArtifactError, CompileOptions, artifact_lock, cache_key, compile_graph, verify_artifact
from ember.compiler.artifact import Artifact
from ember.compiler.compile import compile_stage_count
from ember.compiler.compile_progress import CompileProgress
from ember.compiler.hashing import HashMemo
from ember.compiler.targets import get_target
from ember.graphs.nn.kv_cache import KVCacheStrategy

from .backends import backend_from_runtime
from .pipelines.config import (BLOCK_ENCODINGS, NATIVE_ENCODINGS, PipelineConfig, SupportedEncoding, WeightsFormat,
                               default_cache_dir)
from .pipelines.model_source import ModelSource
from .pipelines.architectures import BUILTIN_ARCHITECTURES
from .pipelines.registry import PipelineRegistry, ResolvedArtifact, load_compiled_artifact
from .pipelines.tokenizer import TextTokenizer, check_tokenizer, export_tokenizer
from .session import default_num_threads

if TYPE_CHECKING:
    from .pipelines.supported_architecture import SupportedArchitecture

logger = logging.getLogger(__name__)


def source_sha256(source: ModelSource, cache_dir: Path) -> str:
    memo = HashMemo(cache_dir / "source-hashes.json")
    digest = hashlib.sha256()
    for file in source.files():
        digest.update(f"{file.name}:{memo.sha256(file)}\n".encode())
    return digest.hexdigest()


#: The compile cache's folder under the cache directory (``ember models`` lists and removes what is there).
ARTIFACTS_DIR = "artifacts"

#: Models with fewer parameters than this default to float32, even from a quantized GGUF: the weights of the file
#: dequantized, exactly, on every CPU. Quantized kernels quantize activations too (int8, per CPU instruction set),
#: which flips the near-tied tokens of small models: SmolLM2-135M answers the README's prompt wrongly in q4_1 and
#: q8_0 (AVX2 here, AVX-512 VNNI in the issue), rightly in float32, whose decode of so small a model is already
#: fast. Measured agreement and speed per encoding: BENCHMARKS.md, "Default encoding".
EXACT_DEFAULT_PARAMETERS = 1_000_000_000


def parameter_count(source: ModelSource) -> int:
    """Elements of every tensor in the checkpoint (read from its header; no weight is loaded)."""
    weights = source.open_weights()
    return sum(int(np.prod(weights.shape(name), dtype=np.int64)) for name in weights.keys())


def resolve_encoding(pipeline_config: PipelineConfig, architecture: "SupportedArchitecture",
                     source: ModelSource, exact_below: int = EXACT_DEFAULT_PARAMETERS) -> str:
    """The encoding asked for; else float16 on a GPU target; else float32 for a model of fewer than ``exact_below``
    parameters; else the GGUF's own (its dominant block type); else the architecture's default.

    Encodings that keep a checkpoint's blocks (``q4_1``, ``q4_k``) must find such blocks in the source.
    """
    on_target = get_target(pipeline_config.target).encodings
    supported = [str(getattr(e, "value", e)) for e in architecture.supported_encodings]
    supported = [e for e in supported if e in on_target]
    block_types = source.block_types()
    encoding = pipeline_config.encoding
    if encoding is None and get_target(pipeline_config.target).device_kind == "cuda" and "float16" in supported:
        encoding = SupportedEncoding.float16  # a GPU's native precision (its tensor cores); float32 on request
    if encoding is None and "float32" in supported and parameter_count(source) < exact_below:
        encoding = SupportedEncoding.float32
    if encoding is None:
        native = NATIVE_ENCODINGS.get(max(block_types, key=lambda t: block_types[t])) if block_types else None
        encoding = native if native is not None and native.value in supported else architecture.default_encoding
    encoding = SupportedEncoding(getattr(encoding, "value", encoding))
    if encoding.value not in supported:
        raise ValueError(f"{architecture.name} on {pipeline_config.target} does not support encoding "
                         f"{encoding.value!r}; supported: {', '.join(supported)}")
    needed = BLOCK_ENCODINGS.get(encoding)
    if needed is not None and needed not in block_types:
        have = ", ".join(sorted(block_types)) or "none (float weights)"
        raise ValueError(f"encoding {encoding.value!r} keeps a GGUF's own {needed} blocks, but {source.path} "
                         f"has no {needed} weights (its block types: {have}); for round-to-nearest quantization "
                         f"use q4_0 or q8_0")
    return encoding.value


def compile_options(pipeline_config: PipelineConfig, architecture: "SupportedArchitecture",
                    source: ModelSource) -> CompileOptions:
    encoding = resolve_encoding(pipeline_config, architecture, source)
    strategies = architecture.supported_encodings.get(SupportedEncoding(encoding))
    strategy = pipeline_config.kv_cache_strategy or (strategies[0] if strategies else KVCacheStrategy.CONTINUOUS)
    if strategies and strategy not in strategies:
        raise ValueError(f"{architecture.name} with {encoding} supports KV cache strategies "
                         f"{', '.join(s.value for s in strategies)}, not {KVCacheStrategy(strategy).value}")
    if pipeline_config.kv_cache_bit_width and not strategies:
        raise ValueError(f"{architecture.name} has no KV cache: kv_cache_bit_width applies to text-generation "
                         f"models (supported: 0, the float cache)")
    extra = architecture.pipeline_model.graph_options(pipeline_config, source)
    paged = KVCacheStrategy(strategy) is KVCacheStrategy.PAGED
    page_size = pipeline_config.kv_cache_page_size if paged else CompileOptions.kv_cache_page_size
    options = CompileOptions(target=pipeline_config.target, encoding=encoding, kv_cache_strategy=strategy,
                             return_logits=pipeline_config.return_logits,
                             kv_cache_bit_width=pipeline_config.kv_cache_bit_width, kv_cache_page_size=page_size,
                             tensor_parallel=pipeline_config.tensor_parallel,
                             slot_graph=paged and bool(pipeline_config.decode_slots) and bool(strategies), **extra)
    refusal = options.slot_graph_refusal()
    if refusal is None and options.slot_graph and strategies and KVCacheStrategy.CONTINUOUS not in strategies:
        refusal = (f"decode slots run the continuous graph; {architecture.name} with {encoding} supports the "
                   f"{', '.join(s.value for s in strategies)} KV cache only")
    if refusal is not None:  # asked for: an error; automatic: slots where the target and architecture run them
        if not pipeline_config.decode_slots_auto:
            raise ValueError(refusal)
        options = dataclasses.replace(options, slot_graph=False)
    if options.kv_cache_bit_width or options.tensor_parallel > 1 or options.slot_graph:
        options.validate()  # an unsupported width or split fails before the graph is built
    return options


def rules_fingerprint(architecture: "SupportedArchitecture") -> str:
    """"" for an entry that reads checkpoints with its spec's weight rules; else the names of the rule functions it
    uses instead, so an artifact built with other rules is never taken from the cache for this one."""
    spec_rules = {WeightsFormat(f).value: rules for f, rules in architecture.spec.weight_rules.items()}
    overridden = {WeightsFormat(f).value: rules for f, rules in architecture.weight_adapters.items()
                  if spec_rules.get(WeightsFormat(f).value) is not rules}
    return "".join(f":{fmt}={rules.__module__}.{rules.__qualname__}" for fmt, rules in sorted(overridden.items()))


def ensure_artifact(pipeline_config: PipelineConfig, architecture: "SupportedArchitecture",
                    source: ModelSource) -> ResolvedArtifact:
    """The verified artifact for this model and configuration, compiling it if the cache has none (an
    ``ArtifactProvider``: ``PIPELINE_REGISTRY``'s).

    Check, compile and publish run as one step under the artifact's cross-process lock
    (``ember.compiler.artifact_lock``): processes started together on an empty cache compile once, the others
    wait and then load what the first wrote, and no process verifies a folder another is replacing. A cached
    folder that fails verification (a damaged or added file, an edited or deleted manifest, half a folder) is
    removed and compiled again in place: everything under the cache's artifacts folder is ember's. With
    ``force_compile`` a valid one is replaced once the new compile is done. Temporary folders that killed
    compiles left are removed on the way. A cache that cannot be written fails here, before any compile, unless
    it already holds this artifact (a read-only cache still serves loads)."""
    if source.kind == "artifact":
        return load_compiled_artifact(pipeline_config, architecture, source)
    start = time.perf_counter()
    cache_dir = Path(pipeline_config.cache_dir or default_cache_dir())  # PipelineConfig fills in the default
    options = compile_options(pipeline_config, architecture, source)
    sha = source_sha256(source, cache_dir)
    directory = cache_dir / ARTIFACTS_DIR / f"{architecture.name}-{cache_key(sha + rules_fingerprint(architecture), options)}"
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        lock = artifact_lock.acquire(directory)
    except OSError as error:
        return _from_unwritable_cache(directory, pipeline_config.force_compile, error, start)
    try:
        artifact_lock.remove_stale_temps(directory.parent, held=directory.name)
        if os.path.lexists(directory):
            try:
                artifact = verify_artifact(directory)
                if not pipeline_config.force_compile:
                    return ResolvedArtifact(artifact, False, time.perf_counter() - start)
            except ArtifactError as error:
                logger.warning("%s; compiling it again in place", error)
                artifact_lock.discard(directory)
        try:
            artifact_lock.check_writable(directory)
        except OSError as error:
            raise _unwritable(directory, error) from None
        artifact = compile_source(source, architecture, options, directory, sha)
    finally:
        lock.release()
    return ResolvedArtifact(artifact, True, time.perf_counter() - start)


def _from_unwritable_cache(directory: Path, force: bool, error: OSError, start: float) -> ResolvedArtifact:
    """The artifact from a cache that cannot be written (no lock can be taken there, and none is needed: nothing
    can replace it), if it holds a valid one and no recompile is asked; else :func:`_unwritable`."""
    if os.path.lexists(directory) and not force:
        try:
            return ResolvedArtifact(verify_artifact(directory), False, time.perf_counter() - start)
        except ArtifactError as damaged:
            logger.warning("%s", damaged)
    raise _unwritable(directory, error) from None


def _unwritable(directory: Path, error: OSError) -> ArtifactError:
    return ArtifactError(f"the compile cache {directory.parent} is not writable ({error.strerror or error}): "
                         f"cannot compile {directory.name} into it; set EMBER_CACHE (or the cache_dir option) to "
                         f"a writable directory")


def compile_source(source: ModelSource, architecture: "SupportedArchitecture", options: CompileOptions,
                   directory: Path, sha: str) -> Artifact:
    """Build the architecture's graph from the checkpoint and compile it into ``directory``."""
    hf_config = source.hf_config()
    check_tokenizer(source)  # a tokenizer or chat template that cannot work fails now, not after the compile
    spec = architecture.spec
    arch_config = spec.config_from_hf(hf_config)
    weights = spec.adapt(arch_config, source.open_weights(), source.checkpoint_format().value,
                         {WeightsFormat(f).value: rules for f, rules in architecture.weight_adapters.items()})
    spec.check_checkpoint(arch_config, weights)
    if options.tensor_parallel > 1 and spec.kv_params(arch_config, KVCacheStrategy.CONTINUOUS, "float32", 1) is None:
        raise ValueError(f"tensor parallelism splits decoders; {architecture.name} has no KV cache (run it with "
                         f"tensor_parallel=1)")
    progress = CompileProgress(compile_stage_count(options, before=1), f"compiling {source.path.name}")
    with progress:  # the bar closes whatever happens
        with progress.stage("reading the weights into the graph"):
            graph = [spec.build_graph(arch_config, weights, options.graph_options(rank))
                     for rank in range(options.tensor_parallel)]
            slot_graph = (spec.build_graph(arch_config, weights, options.slot_graph_options())
                          if options.slot_graph else None)
        return _lower_and_write(graph, source, architecture, options, directory, sha, hf_config, arch_config,
                                progress, slot_graph)


def _lower_and_write(graph: Any, source: ModelSource, architecture: "SupportedArchitecture", options: CompileOptions,
                     directory: Path, sha: str, hf_config: Any, arch_config: Any,
                     progress: CompileProgress, slot_graph: Any = None) -> Artifact:
    """The rest of :func:`compile_source` once the graph is built: the manifest, then lower and write."""
    import json

    spec = architecture.spec
    kv = spec.kv_params(arch_config, KVCacheStrategy(options.kv_cache_strategy), "float32", options.kv_cache_page_size)
    max_positions = architecture.pipeline_model.calculate_max_seq_len(PipelineConfig(model_path=source.path),
                                                                      hf_config)
    manifest: dict[str, Any] = {
        "source": {"path": str(source.path), "format": source.checkpoint_format().value, "sha256": sha},
        "architecture": architecture.name,
        "task": architecture.task.value,
        "encoding": options.encoding,
        "kv_cache_strategy": options.kv_cache_strategy.value,
        "return_logits": options.return_logits.value,
        "limits": {"max_position_embeddings": max_positions, "vocab_size": hf_config.vocab_size},
        "pooling": {"mode": options.pooling, "normalize": options.normalize} if options.pooling else None,
    }
    if kv is not None:
        manifest["kv_params"] = {"dtype": kv.dtype, "n_kv_heads": kv.n_kv_heads, "head_dim": kv.head_dim,
                                 "num_layers": kv.num_layers, "page_size": kv.page_size}

    def write_extra_files(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config.to_dict(), indent=2, default=str))
        export_tokenizer(source, tmp / "tokenizer", hf_config)

    calibration = kv_calibration_tokens(source, hf_config, max_positions) if options.kv_cache_bit_width else None
    # KV cache calibration runs the float model on the backend that will run the artifact.
    runner = (backend_from_runtime(get_target(options.target).runtime_block(), default_num_threads())
              if options.kv_cache_bit_width else None)
    return compile_graph(graph, directory, options, manifest, write_extra_files, calibration, runner, progress,
                         slot_graph)


def kv_calibration_tokens(source: ModelSource, hf_config: Any, max_positions: int) -> tuple[Any, str]:
    """The KV cache calibration text in the model's own tokenizer, as a chat user message where the model has a
    chat template (so its special tokens are calibrated too); random ids if the tokenizer does not know English."""
    import tempfile

    from ember.compiler.calibration.kv_cache import CALIBRATION_TOKENS, calibration_tokens

    with tempfile.TemporaryDirectory(prefix="ember-tokenizer-") as tmp:
        export_tokenizer(source, Path(tmp), hf_config)
        tokenizer = TextTokenizer(tmp)

    def encode(text: str) -> list[int]:
        if tokenizer.has_chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": text}])
        return tokenizer.encode(text)

    return calibration_tokens(encode, hf_config.vocab_size, min(CALIBRATION_TOKENS, max_positions))


#: The registry of every built-in architecture, compiling on first use (``max.pipelines``' ``PIPELINE_REGISTRY``;
#: ``ember.runtime.pipelines`` exports it by this name).
PIPELINE_REGISTRY = PipelineRegistry(BUILTIN_ARCHITECTURES, artifacts=ensure_artifact)
