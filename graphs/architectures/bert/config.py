"""BERT-family configuration: a Hugging Face config to :class:`BertArchConfig`.

One config class serves ``BertModel`` (and checkpoints saved as ``BertForMaskedLM`` /
``BertForSequenceClassification``, whose encoder weights are used), ``RobertaModel`` and
``XLMRobertaModel``. They differ in how positions are numbered: BERT counts ``0 .. S-1``; RoBERTa and
XLM-R start after ``pad_token_id`` and skip padding tokens (``padding_offset``).

Every count is checked where it is read (a positive integer; heads that divide the hidden size; positions
left after RoBERTa's offset), so a bad ``config.json`` is a ValueError naming the file and the field before
a graph is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config_json import check_required_fields
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
#: config.json fields a graph cannot be built without (transformers' class defaults are BERT-base's, not this
#: model's: a missing one would build the wrong shapes).
REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "max_position_embeddings")


def check_config_json(data: Any, path: str | Path) -> None:
    """``config.json``'s own content (before transformers fills in defaults): see :func:`check_required_fields`."""
    check_required_fields(data, path, REQUIRED_HF_FIELDS)


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
        """The config of a transformers config object; a ValueError naming its ``config.json`` and the field
        for a value no graph can be built from."""
        folder = getattr(hf_config, "name_or_path", None)
        where = str(Path(folder) / "config.json") if folder else "model config"

        def count(name: str, default: Any = None, minimum: int = 1) -> int:
            value = getattr(hf_config, name, default)
            if value is None:
                raise ValueError(f"{where}: {name} is missing")
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{where}: {name} must be an integer of at least {minimum}, not {value!r}")
            return value

        model_type = getattr(hf_config, "model_type", None) or "bert"
        by_type = {v: k for k, v in reversed(list(ARCHITECTURES.items()))}  # model type -> its base class
        architectures = getattr(hf_config, "architectures", None)
        if architectures is not None and (not isinstance(architectures, list)
                                          or not all(isinstance(a, str) for a in architectures)):
            raise ValueError(f"{where}: architectures must be a list of class names, not {architectures!r}")
        arch = (architectures or [None])[0] or by_type.get(model_type, "BertModel")
        if arch not in ARCHITECTURES:
            raise ValueError(f"{where}: architecture {arch!r} is not a BERT-family encoder ember builds; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        hidden_act = getattr(hf_config, "hidden_act", "gelu")
        if not isinstance(hidden_act, str) or hidden_act not in GELU_APPROXIMATIONS:
            raise ValueError(f"{where}: hidden_act {hidden_act!r} is not supported; "
                             f"supported: {', '.join(GELU_APPROXIMATIONS)}")
        position_type = getattr(hf_config, "position_embedding_type", None) or "absolute"
        if position_type not in SUPPORTED_POSITION_EMBEDDING_TYPES:
            raise ValueError(f"{where}: position_embedding_type {position_type!r} is not supported (relative "
                             f"position embeddings are not built); "
                             f"supported: {', '.join(SUPPORTED_POSITION_EMBEDDING_TYPES)}")
        hidden = count("hidden_size")
        num_heads = count("num_attention_heads")
        if hidden % num_heads:
            raise ValueError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {num_heads}")
        positions = "padding_offset" if ARCHITECTURES[arch] in PADDING_OFFSET_MODEL_TYPES else "absolute"
        pad = getattr(hf_config, "pad_token_id", None)
        vocab = count("vocab_size")
        if pad is not None and not (isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab):
            raise ValueError(f"{where}: pad_token_id {pad!r} is not a token id below vocab_size {vocab}")
        if positions == "padding_offset" and pad is None:
            raise ValueError(f"{where}: {arch} numbers positions after pad_token_id, but the config has none")
        max_positions = count("max_position_embeddings",
                              minimum=(pad or 0) + 2 if positions == "padding_offset" else 1)
        eps = getattr(hf_config, "layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"{where}: layer_norm_eps must be a positive number, not {eps!r}")
        return cls(
            architecture=arch,
            model_type=ARCHITECTURES[arch],
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=count("num_hidden_layers"),
            num_heads=num_heads,
            intermediate_size=count("intermediate_size"),
            hidden_act=hidden_act,
            layer_norm_eps=float(eps),
            max_position_embeddings=max_positions,
            type_vocab_size=count("type_vocab_size", 2),
            pad_token_id=pad,
            positions=positions,
        )
