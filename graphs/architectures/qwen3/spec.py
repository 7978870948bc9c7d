"""Qwen 3's config, graph and :class:`~..spec.ArchitectureSpec`, each Llama's with Qwen 3's q/k norms added."""
from __future__ import annotations

import dataclasses
from typing import Any

from ...nn import RMSNorm, Transformer
from ...options import GraphOptions
from ...weights.adapter import AdaptedWeights
from ..llama import LlamaArchConfig
from ..llama import build_transformer as build_llama_transformer
from ..llama.weights import SAFETENSORS_RULES
from ..llama_variants import bias_output_projections, variant_spec

ARCHITECTURE = "Qwen3ForCausalLM"
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


def config_from_hf(hf_config: Any) -> LlamaArchConfig:
    """Llama's config of a Qwen 3 ``config.json`` (every field Qwen 3 has is one Llama's config reads), named
    ``Qwen3ForCausalLM`` even when the config lists no ``architectures``."""
    return dataclasses.replace(LlamaArchConfig.from_hf(hf_config), architecture=ARCHITECTURE)


def build_transformer(config: LlamaArchConfig, weights: AdaptedWeights, options: GraphOptions) -> Transformer:
    """Llama's layers, each attention given Qwen 3's ``q_norm`` / ``k_norm``: RMSNorm over ``head_dim``, per head,
    on q and k before rotary (``Attention``'s parameters, so the block, the cache and the lowerings are Llama's),
    and an ``o_proj`` bias with ``attention_bias``."""
    transformer = build_llama_transformer(config, weights, options.return_logits, options.kv_cache_strategy,
                                          options.kv_cache_page_size)
    for i, block in enumerate(transformer.layers):
        path = f"model.layers.{i}.self_attn"
        block.self_attn.q_norm = RMSNorm(f"{path}.q_norm", weights[f"{path}.q_norm.weight"], config.rms_norm_eps)
        block.self_attn.k_norm = RMSNorm(f"{path}.k_norm", weights[f"{path}.k_norm.weight"], config.rms_norm_eps)
    bias_output_projections(transformer, weights, config.attention_bias)
    return transformer


SPEC = variant_spec("qwen3", ARCHITECTURE, config_from_hf=config_from_hf, build_transformer=build_transformer,
                    layer_norms=QK_NORMS, norm_field="head_dim", safetensors_rules=SAFETENSORS_RULES)
