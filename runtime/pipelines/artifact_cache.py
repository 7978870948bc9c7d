"""Compile on first use, load from the cache after: the compile cache keyed by source, options and versions.

The key is computed from the source's bytes (sha256, remembered by size and mtime) and the options the
user gave, so a cached artifact is found without opening the checkpoint. An artifact whose files no
longer match its manifest is reported and recompiled.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.compiler import ArtifactError, CompileOptions, cache_key, compile_graph, verify_artifact
from ember.compiler.artifact import Artifact
from ember.compiler.hashing import HashMemo
from ember.graphs.nn.kv_cache import KVCacheStrategy

from .config import PipelineConfig
from .model_source import ModelSource
from .tokenizer import export_tokenizer

if TYPE_CHECKING:
    from .registry import SupportedArchitecture

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedArtifact:
    artifact: Artifact
    compiled: bool
    seconds: float  # compile time when compiled, verification time when loaded from the cache


def source_sha256(source: ModelSource, cache_dir: Path) -> str:
    memo = HashMemo(cache_dir / "source-hashes.json")
    digest = hashlib.sha256()
    for file in source.files():
        digest.update(f"{file.name}:{memo.sha256(file)}\n".encode())
    return digest.hexdigest()


def compile_options(pipeline_config: PipelineConfig, architecture: "SupportedArchitecture",
                    source: ModelSource) -> CompileOptions:
    encoding = pipeline_config.encoding or architecture.default_encoding
    encoding = getattr(encoding, "value", encoding)
    strategies = architecture.supported_encodings.get(encoding)
    if strategies is None:
        raise ValueError(f"{architecture.name} does not support encoding {encoding!r}; supported: "
                         f"{', '.join(str(getattr(e, 'value', e)) for e in architecture.supported_encodings)}")
    strategy = pipeline_config.kv_cache_strategy or (strategies[0] if strategies else KVCacheStrategy.CONTINUOUS)
    if strategies and strategy not in strategies:
        raise ValueError(f"{architecture.name} with {encoding} supports KV cache strategies "
                         f"{', '.join(s.value for s in strategies)}, not {KVCacheStrategy(strategy).value}")
    extra = architecture.pipeline_model.graph_options(pipeline_config, source)
    return CompileOptions(target=pipeline_config.target, encoding=encoding, kv_cache_strategy=strategy,
                          return_logits=pipeline_config.return_logits, **extra)


def ensure_artifact(pipeline_config: PipelineConfig, architecture: "SupportedArchitecture",
                    source: ModelSource) -> ResolvedArtifact:
    """The verified artifact for this model and configuration, compiling it if the cache has none."""
    start = time.perf_counter()
    if source.kind == "artifact":
        return ResolvedArtifact(verify_artifact(source.path), False, time.perf_counter() - start)
    cache_dir = Path(pipeline_config.cache_dir)
    options = compile_options(pipeline_config, architecture, source)
    sha = source_sha256(source, cache_dir)
    directory = cache_dir / "artifacts" / f"{architecture.name}-{cache_key(sha, options)}"
    if directory.exists() and not pipeline_config.force_compile:
        try:
            return ResolvedArtifact(verify_artifact(directory), False, time.perf_counter() - start)
        except ArtifactError as error:
            logger.warning("%s; recompiling", error)
    artifact = compile_source(source, architecture, options, directory, sha)
    return ResolvedArtifact(artifact, True, time.perf_counter() - start)


def compile_source(source: ModelSource, architecture: "SupportedArchitecture", options: CompileOptions,
                   directory: Path, sha: str) -> Artifact:
    """Build the architecture's graph from the checkpoint and compile it into ``directory``."""
    import json

    hf_config = source.hf_config()
    graph = architecture.graph_builder(hf_config, source.open_weights(), source.weights_format.value, options)
    kv = architecture.pipeline_model.get_kv_params(
        hf_config, PipelineConfig(model_path=source.path, kv_cache_strategy=options.kv_cache_strategy))
    max_positions = architecture.pipeline_model.calculate_max_seq_len(PipelineConfig(model_path=source.path),
                                                                      hf_config)
    manifest: dict[str, Any] = {
        "source": {"path": str(source.path), "format": source.weights_format.value, "sha256": sha},
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

    return compile_graph(graph, directory, options, manifest, write_extra_files)
