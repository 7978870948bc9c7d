"""BERT-family encoders: ``BertModel``, ``RobertaModel``, ``XLMRobertaModel`` (and their MLM / classifier
checkpoints, read for their encoder weights); :data:`SPEC` is everything the compiler and runtime ask of them."""
from __future__ import annotations

from .config import ARCHITECTURES, BertArchConfig
from .graph import build_encoder
from .spec import SPEC, build_graph
from .weights import SAFETENSORS_RULES

__all__ = ["ARCHITECTURES", "BertArchConfig", "SAFETENSORS_RULES", "SPEC", "build_encoder", "build_graph"]
