"""Qwen 3 decoders (``Qwen3ForCausalLM``): Llama's structure with an RMSNorm over each head of q and k.

What differs from Qwen 2 besides the q/k norms, transformers' config already says and Llama's config reads: an
explicit ``head_dim`` (not ``hidden_size / heads``), no q/k/v bias by default (``attention_bias``), and a sliding
window per layer from ``layer_types``. So the config is Llama's, the builder is Llama's with the norms set on its
attention layers, and the spec is Llama's with those differences (:func:`~..llama_variants.variant_spec`). No
GGUF: llama.cpp's ``qwen3`` files are not read (the spec lists no GGUF architecture, so loading one says which
are supported).
"""
from __future__ import annotations

from .spec import ARCHITECTURE, SPEC, build_transformer, config_from_hf

__all__ = ["ARCHITECTURE", "SPEC", "build_transformer", "config_from_hf"]
