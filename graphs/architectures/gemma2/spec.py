"""Gemma 2's graph and :class:`~..spec.ArchitectureSpec`: Llama's builder, its layers given Gemma 2's parameters."""
from __future__ import annotations

import numpy as np

from ...nn import Embedding, RMSNorm, Transformer
from ...options import GraphOptions
from ...weights.adapter import AdaptedWeights
from ..llama import build_transformer as build_llama_transformer
from ..llama_variants import bias_output_projections, variant_spec
from .config import ARCHITECTURE, Gemma2ArchConfig
from .weights import SAFETENSORS_RULES, SANDWICH_NORMS


def build_transformer(config: Gemma2ArchConfig, weights: AdaptedWeights, options: GraphOptions) -> Transformer:
    """Llama's layers with Gemma 2's parameters set on them (see the package doc).

    Llama's builder puts ``post_attention_layernorm`` before the MLP; in Gemma 2 it normalizes the attention's
    output and ``pre_feedforward_layernorm`` comes before the MLP, so each block's norms are set by role here."""
    transformer = build_llama_transformer(config, weights, options.return_logits, options.kv_cache_strategy,
                                          options.kv_cache_page_size)
    for i, block in enumerate(transformer.layers):
        block.attention_output_norm = _layer_norm(config, weights, i, "post_attention_layernorm")
        block.mlp_norm = _layer_norm(config, weights, i, "pre_feedforward_layernorm")
        block.mlp_output_norm = _layer_norm(config, weights, i, "post_feedforward_layernorm")
        block.self_attn.scale = config.attention_scale
        block.self_attn.softcap = config.attn_logit_softcapping
    # transformers multiplies by sqrt(hidden_size) cast to the model's dtype: float32 here
    embedding = transformer.embedding
    if not isinstance(embedding, Embedding):  # the builder's own layer, before any split
        raise TypeError(f"{embedding.name} is a {type(embedding).__name__}, not an Embedding to scale")
    embedding.scale = float(np.float32(config.hidden_size ** 0.5))
    transformer.logit_softcap = config.final_logit_softcapping
    bias_output_projections(transformer, weights, config.attention_bias)
    return transformer


def _layer_norm(config: Gemma2ArchConfig, weights: AdaptedWeights, layer: int, module: str) -> RMSNorm:
    path = f"model.layers.{layer}.{module}"
    return RMSNorm(path, weights[f"{path}.weight"], config.rms_norm_eps)


SPEC = variant_spec("gemma2", ARCHITECTURE, config_from_hf=Gemma2ArchConfig.from_hf,
                    build_transformer=build_transformer, layer_norms=SANDWICH_NORMS, norm_field="hidden_size",
                    safetensors_rules=SAFETENSORS_RULES)
