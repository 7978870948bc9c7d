"""Linear layer: ``x @ W^T (+ b)``, stored as ONNX ``MatMul`` with the weight kept ``[in, out]``."""
from __future__ import annotations

from typing import Protocol

import onnx_ir as ir

from ..ir import ops
from ..weights.adapter import WeightRef
from .layer import Layer


class Projection(Protocol):
    """What a block asks of its matrix products: a name and a call. A :class:`Linear`, or one rank's shard of one
    (``graphs/nn/distributed``), whose call adds the collectives."""

    name: str

    def __call__(self, x: ir.Value) -> ir.Value: ...


class Linear(Layer):
    """A ``[out, in]`` checkpoint weight applied as ``MatMul(x, W^T)``; the transpose is done once, on write."""

    def __init__(self, name: str, weight: WeightRef, bias: WeightRef | None = None):
        super().__init__(name)
        self.weight_ref = weight
        self.bias_ref = bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: ir.Value) -> ir.Value:
        with self.scope():
            y = ops.matmul(x, self.weight(self.weight_ref.transposed()))
            if self.bias_ref is not None:
                y = ops.add(y, self.weight(self.bias_ref))
            return y


class TiedOutput(Layer):
    """The output projection that reuses the ``[vocab, dim]`` embedding table: ``Gemm(x, E, transB=1)``.

    No transposed copy of the (often largest) table is stored; ``x`` must be 2-D ``[rows, dim]``.
    """

    def __init__(self, name: str, table: WeightRef):
        super().__init__(name)
        self.table = table

    def __call__(self, x: ir.Value) -> ir.Value:
        with self.scope():
            return ops.gemm(x, self.weight(self.table), trans_b=True)
