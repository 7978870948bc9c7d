"""BERT-family configuration: a Hugging Face config to :class:`BertArchConfig`.

One config class serves ``BertModel`` (and checkpoints saved as ``BertForMaskedLM`` /
``BertForSequenceClassification``, whose encoder weights are used), ``RobertaModel`` and
``XLMRobertaModel``. They differ in how positions are numbered: BERT counts ``0 .. S-1``; RoBERTa and
XLM-R start after ``pad_token_id`` and skip padding tokens (``padding_offset``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...nn.encoder_block import GELU_APPROXIMATIONS

# HF ``architectures`` names this family builds, and the ``model_type`` each comes with.
ARCHITECTURES = {
    "BertModel": "bert", "BertForMaskedLM": "bert", "BertForSequenceClassification": "bert",
    "RobertaModel": "roberta", "RobertaForMaskedLM": "roberta", "RobertaForSequenceClassification": "roberta",
    "XLMRobertaModel": "xlm-roberta", "XLMRobertaForMaskedLM": "xlm-roberta",
    "XLMRobertaForSequenceClassification": "xlm-roberta",
}
# model types whose positions start after the padding index (transformers' create_position_ids_from_input_ids)
PADDING_OFFSET_MODEL_TYPES = ("roberta", "xlm-roberta")
SUPPORTED_POSITION_EMBEDDING_TYPES = ("absolute",)


@dataclass(frozen=True)
class BertArchConfig:
    """Everything the graph builder needs, with HF's defaults resolved."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int | None
    positions: str  # "absolute" (0 .. S-1) or "padding_offset" (RoBERTa)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_sequence_length(self) -> int:
        """The longest input the position table covers (RoBERTa reserves ``pad_token_id + 1`` rows)."""
        if self.positions == "padding_offset":
            return self.max_position_embeddings - (self.pad_token_id or 0) - 1
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf_config: Any) -> "BertArchConfig":
        model_type = getattr(hf_config, "model_type", None) or "bert"
        by_type = {v: k for k, v in reversed(list(ARCHITECTURES.items()))}  # model type -> its base class
        arch = (getattr(hf_config, "architectures", None) or [None])[0] or by_type.get(model_type, "BertModel")
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is not a BERT-family encoder ember builds; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        hidden_act = getattr(hf_config, "hidden_act", "gelu")
        if not isinstance(hidden_act, str) or hidden_act not in GELU_APPROXIMATIONS:
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: {', '.join(GELU_APPROXIMATIONS)}")
        position_type = getattr(hf_config, "position_embedding_type", None) or "absolute"
        if position_type not in SUPPORTED_POSITION_EMBEDDING_TYPES:
            raise ValueError(f"position_embedding_type {position_type!r} is not supported (relative position "
                             f"embeddings are not built); supported: {', '.join(SUPPORTED_POSITION_EMBEDDING_TYPES)}")
        num_heads = hf_config.num_attention_heads
        if hf_config.hidden_size % num_heads:
            raise ValueError(f"hidden_size {hf_config.hidden_size} is not a multiple of {num_heads} heads")
        positions = "padding_offset" if ARCHITECTURES[arch] in PADDING_OFFSET_MODEL_TYPES else "absolute"
        pad = getattr(hf_config, "pad_token_id", None)
        if positions == "padding_offset" and pad is None:
            raise ValueError(f"{arch} numbers positions after pad_token_id, but the config has none")
        return cls(
            architecture=arch,
            model_type=ARCHITECTURES[arch],
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            intermediate_size=hf_config.intermediate_size,
            hidden_act=hidden_act,
            layer_norm_eps=float(getattr(hf_config, "layer_norm_eps", 1e-12)),
            max_position_embeddings=hf_config.max_position_embeddings,
            type_vocab_size=getattr(hf_config, "type_vocab_size", 2),
            pad_token_id=pad,
            positions=positions,
        )
