"""The base of ember's layers: a named module that owns weights and emits ops when called."""
from __future__ import annotations

import onnx_ir as ir

from ..ir.graph import current_graph
from ..weights.adapter import WeightRef

FLOAT = ir.DataType.FLOAT


class Layer:
    """A module with a checkpoint path (``model.layers.3.mlp``) used for node scopes and weight names."""

    def __init__(self, name: str):
        self.name = name

    def weight(self, ref: WeightRef) -> ir.Value:
        """The weight as an initializer of the active graph (loaded only when the model is written)."""
        return current_graph().add_weight(ref.name, FLOAT, ref.shape, ref.load, ref.blocks)

    def scope(self):
        return current_graph().scope(self.name)
