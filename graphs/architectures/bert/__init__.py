"""BERT-family encoders: ``BertModel``, ``RobertaModel``, ``XLMRobertaModel`` (and their MLM / classifier
checkpoints, read for their encoder weights)."""
from __future__ import annotations

from typing import Any

import onnx_ir as ir

from ...weights.adapter import AdaptedWeights
from .config import ARCHITECTURES, BertArchConfig
from .graph import build_encoder, build_graph
from .weights import SAFETENSORS_RULES


def build_from_checkpoint(hf_config: Any, source: Any, weights_format: str, options: Any = None) -> ir.Model:
    """The high-level encoder graph of a checkpoint (``weights_format``: ``safetensors``).

    ``options`` is the compiler's ``CompileOptions``: its ``pooling`` (None, "mean", "cls", "max",
    "lasttoken") and ``normalize`` apply; ``options=None`` returns the last hidden state.
    """
    if weights_format != "safetensors":
        raise ValueError(f"weights format {weights_format!r} is not supported for BERT-family encoders; "
                         "supported: safetensors")
    config = BertArchConfig.from_hf(hf_config)
    pooling = getattr(options, "pooling", None)
    normalize = bool(getattr(options, "normalize", False)) if pooling is not None else False
    return build_graph(config, AdaptedWeights(source, SAFETENSORS_RULES), pooling, normalize)


__all__ = ["ARCHITECTURES", "BertArchConfig", "SAFETENSORS_RULES", "build_encoder", "build_graph",
           "build_from_checkpoint"]
