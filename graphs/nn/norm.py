"""Normalization layers: RMSNorm (Llama family) and LayerNorm (BERT family)."""
from __future__ import annotations

import onnx_ir as ir

from ..ir import ops
from ..weights.adapter import WeightRef
from .layer import Layer


class RMSNorm(Layer):
    """``x / sqrt(mean(x^2) + eps) * weight`` as ``RMSNormalization``; targets may fuse it with the residual."""

    def __init__(self, name: str, weight: WeightRef, eps: float):
        super().__init__(name)
        self.weight_ref = weight
        self.eps = eps

    def __call__(self, x: ir.Value) -> ir.Value:
        with self.scope():
            return ops.rms_norm(x, self.weight(self.weight_ref), self.eps)


class LayerNorm(Layer):
    """``LayerNormalization`` over the last axis, with optional bias."""

    def __init__(self, name: str, weight: WeightRef, bias: WeightRef | None, eps: float):
        super().__init__(name)
        self.weight_ref, self.bias_ref, self.eps = weight, bias, eps

    def __call__(self, x: ir.Value) -> ir.Value:
        with self.scope():
            bias = self.weight(self.bias_ref) if self.bias_ref is not None else None
            return ops.layer_norm(x, self.weight(self.weight_ref), bias, self.eps)
