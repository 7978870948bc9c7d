"""The gated feed-forward block of Llama-family models: ``down(act(gate(x)) * up(x))``."""
from __future__ import annotations

import onnx_ir as ir

from ..ir import ops
from .linear import Projection
from .layer import Layer

ACTIVATIONS = {
    "silu": ops.silu,
    "swish": ops.silu,
    "gelu": lambda x: ops.gelu(x, "none"),
    "gelu_pytorch_tanh": lambda x: ops.gelu(x, "tanh"),
}


class MLP(Layer):
    """Gated MLP (SwiGLU with ``silu``)."""

    def __init__(self, name: str, gate_proj: Projection, up_proj: Projection, down_proj: Projection,
                 activation: str = "silu"):
        super().__init__(name)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x: ir.Value) -> ir.Value:
        gate, up = self.gate_proj(x), self.up_proj(x)
        with self.scope():
            hidden = ops.mul(self.activation(gate), up)
        return self.down_proj(hidden)
