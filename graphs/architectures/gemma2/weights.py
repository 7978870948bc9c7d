"""Gemma 2 checkpoint names to ember names: Llama's rules, with every RMSNorm weight ``w`` read as ``1 + w``.

transformers' ``Gemma2RMSNorm`` stores ``w`` and multiplies by ``1 + w`` (computed in float32). Folding the 1 in
here, once per weight when the checkpoint is read, rather than in the norm layer:

- keeps the graph's norm the plain ``RMSNormalization`` every target already lowers and fuses (the residual
  ``Add`` + norm into ``SkipSimplifiedLayerNormalization``), with no extra op per norm and step;
- puts the offset where it belongs, in how one checkpoint format stores the weight: llama.cpp's GGUF converter
  already writes ``1 + w``, so a GGUF reader would take the weights as they are;
- gives transformers' numbers: ``1 + w`` in float32 (a half-precision checkpoint is widened first, as
  transformers does before adding).
"""
from __future__ import annotations

import re

import numpy as np

from ...weights.adapter import WeightRule
from ..llama.weights import SAFETENSORS_RULES as LLAMA_RULES

#: The norms Gemma 2 adds to Llama's two per layer: each sub-layer's output is normalized before its residual add.
SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
NORMS = ("input_layernorm", "post_attention_layernorm", *SANDWICH_NORMS)


def plus_one(weight: np.ndarray, _match: re.Match[str]) -> np.ndarray:
    """``1 + w`` in float32."""
    return weight.astype(np.float32) + np.float32(1.0)


SAFETENSORS_RULES = [
    # ``model.`` is optional, as for Llama's bare ``*Model`` checkpoints
    WeightRule(rf"(?:model\.)?((?:layers\.\d+\.(?:{'|'.join(NORMS)})|norm)\.weight)", r"model.\1", plus_one),
    *LLAMA_RULES,
]
