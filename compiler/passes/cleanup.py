"""Drop nodes and initializers that no output depends on (left behind by lowering and fusion)."""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass


def remove_unused(model: ir.Model) -> ir.Model:
    RemoveUnusedNodesPass()(model)
    return model
