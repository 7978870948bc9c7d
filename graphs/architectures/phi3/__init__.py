"""Phi-3 decoders (``Phi3ForCausalLM``: Phi-3 mini/medium, Phi-3.5 mini, Phi-4 mini): Llama's structure, stored
and configured differently, so everything here is a parameter of the Llama family's functions.

- q, k and v are one ``qkv_proj`` and the MLP's gate and up one ``gate_up_proj``, stacked by rows: weight rules
  split them into Llama's tensors (:mod:`.weights`), so the builder, the KV cache and the lowerings are Llama's;
- ``sliding_window``, when set, windows every layer (transformers' ``Phi3Model``);
- ``partial_rotary_factor`` (Phi-4 mini: 0.75) and ``longrope`` scaling (the 128k models) are read by Llama's
  config; a longrope model takes ``original_max_position_embeddings`` positions (graphs/nn/rotary.py says why);
- the end-of-turn tokens (``<|end|>``) are ``generation_config.json``'s ``eos_token_id`` list, which the
  runtime's tokenizer reads for every model.

No GGUF: the spec lists no GGUF architecture, so loading one says which are supported.
"""
from __future__ import annotations

from .spec import ARCHITECTURE, SPEC, config_from_hf
from .weights import safetensors_rules

__all__ = ["ARCHITECTURE", "SPEC", "config_from_hf", "safetensors_rules"]
