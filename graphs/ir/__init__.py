"""ember's graph API: a typed op layer over ``onnx_ir`` and the ``ember`` custom-op domain."""
from . import custom, ops
from .graph import Graph, current_graph
from .versions import EMBER_DOMAIN, IR_VERSION, ONNX_OPSET, OPSET_IMPORTS

__all__ = ["Graph", "current_graph", "ops", "custom", "EMBER_DOMAIN", "IR_VERSION", "ONNX_OPSET", "OPSET_IMPORTS"]
