"""The BERT-family encoder graph, assembled from ember's layers."""
from __future__ import annotations

from ...nn import Embedding, Encoder, EncoderBlock, EncoderEmbeddings, EncoderSelfAttention, LayerNorm, Linear
from ...weights.adapter import AdaptedWeights
from .config import BertArchConfig


def build_encoder(config: BertArchConfig, weights: AdaptedWeights, pooling: str | None = None,
                  normalize: bool = False) -> Encoder:
    """The layers of one BERT / RoBERTa / XLM-R checkpoint (names as ``BertModel`` has them)."""

    def linear(path: str) -> Linear:
        return Linear(path, weights[f"{path}.weight"], weights[f"{path}.bias"])

    def layer_norm(path: str) -> LayerNorm:
        return LayerNorm(path, weights[f"{path}.weight"], weights[f"{path}.bias"], config.layer_norm_eps)

    types = "embeddings.token_type_embeddings.weight"
    embeddings = EncoderEmbeddings(
        "embeddings",
        Embedding("embeddings.word_embeddings", weights["embeddings.word_embeddings.weight"]),
        weights["embeddings.position_embeddings.weight"],
        Embedding("embeddings.token_type_embeddings", weights[types]) if types in weights else None,
        layer_norm("embeddings.LayerNorm"),
        positions=config.positions, padding_idx=config.pad_token_id)

    blocks = []
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        attention = EncoderSelfAttention(
            f"{p}.attention.self", linear(f"{p}.attention.self.query"), linear(f"{p}.attention.self.key"),
            linear(f"{p}.attention.self.value"), num_heads=config.num_heads)
        blocks.append(EncoderBlock(
            p, attention, linear(f"{p}.attention.output.dense"), layer_norm(f"{p}.attention.output.LayerNorm"),
            linear(f"{p}.intermediate.dense"), linear(f"{p}.output.dense"), layer_norm(f"{p}.output.LayerNorm"),
            config.hidden_act))
    return Encoder(embeddings, blocks, pooling=pooling, normalize=normalize,
                   max_sequence_length=config.max_sequence_length)
