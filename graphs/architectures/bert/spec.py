"""The BERT family's :class:`~ember.graphs.architectures.spec.ArchitectureSpec` (BERT, RoBERTa, XLM-R)."""
from __future__ import annotations

import onnx_ir as ir

from ...options import GraphOptions
from ...weights.adapter import AdaptedWeights
from ..spec import ArchitectureSpec
from ..weight_bytes import FLOAT32, matrix_bytes
from .config import ARCHITECTURES, BertArchConfig, check_config_json
from .graph import build_encoder
from .weights import SAFETENSORS_RULES


def build_graph(config: BertArchConfig, weights: AdaptedWeights, options: GraphOptions) -> ir.Model:
    """The high-level encoder graph (standard ONNX ops only): the last hidden state, or the pooled (and
    normalized) vector when ``options.pooling`` is set."""
    normalize = options.normalize if options.pooling is not None else False
    return build_encoder(config, weights, options.pooling, normalize).build(config.architecture)


def weight_bytes(config: BertArchConfig, encoding: str) -> int:
    """Per layer the four attention and two feed-forward matrices in ``encoding``, their biases and the two
    LayerNorms in float32; the three embedding tables and their LayerNorm in float32."""
    h, i = config.hidden_size, config.intermediate_size
    per_layer = (4 * matrix_bytes(h, h, encoding) + matrix_bytes(i, h, encoding) + matrix_bytes(h, i, encoding)
                 + (4 * h + i + h) * FLOAT32 + 4 * h * FLOAT32)
    tables = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * h + 2 * h
    return config.num_layers * per_layer + tables * FLOAT32


SPEC = ArchitectureSpec(
    name="bert",
    hf_architectures=tuple(ARCHITECTURES),
    config_from_hf=BertArchConfig.from_hf,
    check_config_json=check_config_json,
    build_graph=build_graph,
    weight_rules={"safetensors": lambda config, checkpoint: SAFETENSORS_RULES},
    # RoBERTa-style models number positions after the padding index: the position table's first rows are never
    # used (the one place this offset is known: BertArchConfig.max_sequence_length).
    max_positions=lambda config: config.max_sequence_length,
    weight_bytes=weight_bytes,
)
