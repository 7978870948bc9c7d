"""The post-norm encoder block of BERT-family models (``BertLayer``).

Unlike the pre-norm decoder block, the residual sum is normalized *after* each sub-layer::

    h = LayerNorm(h + dense(attention(h)))          # attention.output
    h = LayerNorm(h + dense(act(intermediate(h))))  # intermediate, output

so the LayerNorm reads ``Add(sub_layer, h)``. The graph keeps the plain standard ops: engines fuse what pays
(onnxruntime's session optimizer turns the bias ``Add`` + ``Gelu`` into ``BiasGelu``; the ort-cpu target turns
its ``SkipLayerNormalization`` fusion off, measured slower there).
"""
from __future__ import annotations

import onnx_ir as ir

from ..ir import ops
from ..ir.graph import current_graph
from .encoder_attention import EncoderSelfAttention
from .layer import Layer
from .linear import Linear
from .norm import LayerNorm

# HF ``hidden_act`` -> ONNX ``Gelu`` approximation
GELU_APPROXIMATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


class EncoderBlock(Layer):
    """Self-attention and a (non-gated) GELU feed-forward, each followed by residual + LayerNorm."""

    def __init__(self, name: str, attention: EncoderSelfAttention, attention_output: Linear,
                 attention_norm: LayerNorm, intermediate: Linear, output: Linear, output_norm: LayerNorm,
                 activation: str = "gelu"):
        super().__init__(name)
        if activation not in GELU_APPROXIMATIONS:
            raise ValueError(f"hidden_act {activation!r} is not supported; supported: {', '.join(GELU_APPROXIMATIONS)}")
        self.attention, self.attention_output, self.attention_norm = attention, attention_output, attention_norm
        self.intermediate, self.output, self.output_norm = intermediate, output, output_norm
        self.approximate = GELU_APPROXIMATIONS[activation]

    def __call__(self, h: ir.Value, bias: ir.Value) -> ir.Value:
        # Scopes follow HF's modules: the residual belongs to ``attention.output`` / ``output`` (the modules
        # that own the dense and the LayerNorm), the activation to ``intermediate``.
        attended = self.attention_output(self.attention(h, bias))
        with current_graph().scope(_parent(self.attention_norm.name)):
            h = ops.add(attended, h, name="residual")
        h = self.attention_norm(h)
        up = self.intermediate(h)
        with current_graph().scope(_parent(self.intermediate.name)):
            up = ops.gelu(up, self.approximate)
        down = self.output(up)
        with current_graph().scope(_parent(self.output_norm.name)):
            h = ops.add(down, h, name="residual")
        return self.output_norm(h)


def _parent(module_path: str) -> str:
    return module_path.rsplit(".", 1)[0]
