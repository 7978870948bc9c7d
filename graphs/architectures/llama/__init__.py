"""Llama-family decoders: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``; :data:`SPEC` is
everything the compiler and runtime ask of them."""
from __future__ import annotations

from .config import ARCHITECTURES, GGUF_ARCHITECTURES, LlamaArchConfig, hf_config_from_gguf
from .graph import build_transformer, kv_params
from .spec import SPEC, build_graph, llama_spec
from .weights import SAFETENSORS_RULES, gguf_rules

__all__ = ["ARCHITECTURES", "GGUF_ARCHITECTURES", "LlamaArchConfig", "SPEC", "hf_config_from_gguf", "build_graph",
           "build_transformer", "kv_params", "llama_spec", "SAFETENSORS_RULES", "gguf_rules"]
