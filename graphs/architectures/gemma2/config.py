"""Gemma 2's configuration: Llama's config (:class:`~..llama.LlamaArchConfig`, which reads every field the two
share) plus the three numbers only Gemma 2 has, checked where they are read."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ...nn.mlp import ACTIVATIONS
from ..llama import LlamaArchConfig
from ..llama.config import _config_file, _positive_number

ARCHITECTURE = "Gemma2ForCausalLM"


@dataclass(frozen=True)
class Gemma2ArchConfig(LlamaArchConfig):
    """A Llama config with Gemma 2's attention scale and soft-capping (0: no capping), so that every function of
    the Llama family (KV parameters, weight bytes, checkpoint check, layer builder) takes it as it is."""

    query_pre_attn_scalar: float = 1.0
    attn_logit_softcapping: float = 0.0
    final_logit_softcapping: float = 0.0

    @property
    def attention_scale(self) -> float:
        """The softmax scale: ``query_pre_attn_scalar ** -0.5`` (transformers' ``Gemma2Attention.scaling``)."""
        return self.query_pre_attn_scalar ** -0.5

    @classmethod
    def from_hf(cls, hf_config: Any) -> Gemma2ArchConfig:
        """The config of a transformers ``Gemma2Config``; a ValueError naming its ``config.json`` and the field for a
        value no graph can be built from. Gemma 2 names its activation ``hidden_activation`` (Llama:
        ``hidden_act``, which Gemma 2 configs may carry but transformers ignores)."""
        where = _config_file(hf_config)
        base = LlamaArchConfig.from_hf(hf_config)
        activation = getattr(hf_config, "hidden_activation", None) or "gelu_pytorch_tanh"
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_activation {activation!r} is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")

        def cap(name: str) -> float:  # None or 0: no capping
            value = getattr(hf_config, name, None)
            return _positive_number(value, f"{where}: {name}") if value else 0.0

        return cls(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(LlamaArchConfig)},
                      "architecture": ARCHITECTURE, "hidden_act": activation},
                   query_pre_attn_scalar=_positive_number(getattr(hf_config, "query_pre_attn_scalar", None),
                                                          f"{where}: query_pre_attn_scalar"),
                   attn_logit_softcapping=cap("attn_logit_softcapping"),
                   final_logit_softcapping=cap("final_logit_softcapping"))
