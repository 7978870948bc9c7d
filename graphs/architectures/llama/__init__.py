"""Llama-family decoders: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``."""
from __future__ import annotations

from typing import Any

import onnx_ir as ir

from ...nn.kv_cache import KVCacheStrategy
from ...nn.transformer import ReturnLogits
from ...weights.adapter import AdaptedWeights
from .config import ARCHITECTURES, GGUF_ARCHITECTURES, LlamaArchConfig, hf_config_from_gguf
from .graph import DEFAULT_PAGE_SIZE, build_graph, build_transformer, kv_params
from .weights import SAFETENSORS_RULES, gguf_rules


def build_from_checkpoint(hf_config: Any, source: Any, weights_format: str, options: Any = None) -> ir.Model:
    """The high-level graph of a checkpoint (``weights_format``: ``safetensors`` or ``gguf``).

    ``options`` is the compiler's ``CompileOptions`` (its ``return_logits``, ``kv_cache_strategy`` and
    ``kv_cache_page_size`` apply).
    """
    config = LlamaArchConfig.from_hf(hf_config)
    rules = gguf_rules(config, source.architecture) if weights_format == "gguf" else SAFETENSORS_RULES
    return_logits = getattr(options, "return_logits", ReturnLogits.LAST_TOKEN)
    strategy = getattr(options, "kv_cache_strategy", KVCacheStrategy.CONTINUOUS)
    page_size = getattr(options, "kv_cache_page_size", None) or DEFAULT_PAGE_SIZE
    return build_graph(config, AdaptedWeights(source, rules), return_logits, strategy, page_size)


__all__ = ["ARCHITECTURES", "GGUF_ARCHITECTURES", "LlamaArchConfig", "hf_config_from_gguf", "build_graph",
           "build_transformer", "build_from_checkpoint", "kv_params", "SAFETENSORS_RULES", "gguf_rules"]
