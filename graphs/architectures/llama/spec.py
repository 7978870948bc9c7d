"""The Llama family's :class:`~ember.graphs.architectures.spec.ArchitectureSpec` (Llama, Mistral, Qwen2), and
:func:`llama_spec`, the factory its variants (Qwen3, Phi3, Gemma2) start from."""
from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from ...nn.kv_cache import KVCacheParams, KVCacheStrategy
from ...options import GraphOptions
from ...weights.adapter import AdaptedWeights
from ..decoder_graph import build_decoder_graph
from ..spec import ArchitectureSpec
from ..weight_bytes import FLOAT32, matrix_bytes
from .config import ARCHITECTURES, GGUF_ARCHITECTURES, LlamaArchConfig, check_checkpoint, check_config_json, \
    hf_config_from_gguf
from .graph import build_transformer, kv_params
from .weights import SAFETENSORS_RULES, gguf_rules


def build_graph(config: LlamaArchConfig, weights: AdaptedWeights, options: GraphOptions) -> ir.Model:
    """The high-level graph: standard ops plus ``ember.CachedAttention`` (CONTINUOUS) or ``ember.PagedAttention``."""
    return build_decoder_graph(build_transformer(config, weights, options.return_logits, options.kv_cache_strategy,
                                                 options.kv_cache_page_size), options, config.architecture)


def decoder_kv_params(config: Any, strategy: KVCacheStrategy, dtype: str, page_size: int) -> KVCacheParams:
    return kv_params(config, strategy, dtype, page_size)


def decoder_weight_bytes(config: Any, encoding: str) -> int:
    """The matrices of every block and the output head in ``encoding``; the embedding table, norms, biases and
    the rotary cos/sin tables in float32 (a tied head is quantized as its own copy of the table, which stays
    float for the lookup)."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    inter, vocab = config.intermediate_size, config.vocab_size
    per_layer = (matrix_bytes(q, h, encoding) + 2 * matrix_bytes(kv, h, encoding) + matrix_bytes(h, q, encoding)
                 + 2 * matrix_bytes(inter, h, encoding) + matrix_bytes(h, inter, encoding) + 2 * h * FLOAT32)
    if getattr(config, "attention_bias", False):
        per_layer += (q + 2 * kv) * FLOAT32
    head = matrix_bytes(vocab, h, encoding)
    if encoding == "float32" and config.tie_word_embeddings:
        head = 0  # the head reads the table itself
    rotary = config.max_position_embeddings * int(config.head_dim * config.partial_rotary_factor) * FLOAT32  # cos|sin
    return config.num_layers * per_layer + vocab * h * FLOAT32 + head + h * FLOAT32 + rotary


def llama_spec(name: str, hf_architectures: tuple[str, ...], **fields: Any) -> ArchitectureSpec:
    """A spec with the Llama family's functions, ``fields`` replacing any of them (a variant's differences)."""
    base = ArchitectureSpec(
        name=name,
        hf_architectures=hf_architectures,
        config_from_hf=LlamaArchConfig.from_hf,
        check_config_json=check_config_json,
        build_graph=build_graph,
        weight_rules={"safetensors": lambda config, checkpoint: SAFETENSORS_RULES,
                      "gguf": lambda config, checkpoint: gguf_rules(config, checkpoint.architecture)},
        max_positions=lambda config: config.max_position_embeddings,
        weight_bytes=decoder_weight_bytes,
        kv_params=decoder_kv_params,
        check_checkpoint=check_checkpoint,
    )
    return dataclasses.replace(base, **fields)


SPEC = llama_spec("llama", tuple(ARCHITECTURES), gguf_architectures=dict(GGUF_ARCHITECTURES),
                  hf_config_from_gguf=hf_config_from_gguf)
