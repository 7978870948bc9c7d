"""Inline model-local functions (``use_subgraphs``' blocks, ``graphs/ir/subgraphs.py``) back into the main graph,
first of all passes: quantization and the attention lowerings look at nodes and their weights there."""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass


def inline_functions(model: ir.Model) -> ir.Model:
    if model.functions:
        InlinePass()(model)
    return model
