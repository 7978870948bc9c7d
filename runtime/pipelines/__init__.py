"""ember's pipeline layer (``max.pipelines``' public names).

Names are imported on first use (PEP 562), so importing one module of this package (``context``, ``config``)
does not import every other, and nothing here imports the compiler until a model is compiled
(``PIPELINE_REGISTRY`` comes from ``ember.runtime.compile_cache``, the compile-on-first-use module above).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KVCacheParams": "ember.graphs.nn.kv_cache", "KVCacheStrategy": "ember.graphs.nn.kv_cache",
    "ReturnLogits": "ember.graphs.nn.transformer",
    "BUILTIN_ARCHITECTURES": ".architectures",
    # Compiles on first use, so it lives above this package with the compile cache; exported here by MAX's name.
    "PIPELINE_REGISTRY": "ember.runtime.compile_cache",
    "BertInputs": ".bert", "BertModelConfig": ".bert", "BertPipelineModel": ".bert",
    "PipelineConfig": ".config", "SupportedEncoding": ".config", "WeightsFormat": ".config",
    "upper_bounded_default": ".config",
    "FinishReason": ".context", "SamplingParams": ".context", "TextContext": ".context",
    "DecoderInputs": ".decoder", "DecoderPipelineModel": ".decoder",
    "EmbeddingsContext": ".embeddings", "EmbeddingsPipeline": ".embeddings", "EmbeddingsResponse": ".embeddings",
    "KVCacheMixin": ".interfaces", "ModelInputs": ".interfaces", "ModelOutputs": ".interfaces",
    "PipelineModel": ".interfaces",
    "ModelRunner": ".model_runner",
    "ModelSource": ".model_source", "default_embeddings_model_path": ".model_source",
    "default_model_path": ".model_source",
    "ModelFetchError": ".model_store",
    "PoolingConfig": ".pooling_config",
    "PipelineRegistry": ".registry", "get_pipeline_for_task": ".registry",
    "PipelineTask": ".supported_architecture", "RopeType": ".supported_architecture",
    "SupportedArchitecture": ".supported_architecture", "ResolvedModel": ".supported_architecture",
    "TextGenerationPipeline": ".text_generation", "TextResponse": ".text_generation",
    "TextTokenizer": ".tokenizer",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__} has no attribute {name}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
