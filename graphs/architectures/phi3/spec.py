"""Phi-3's config and :class:`~..spec.ArchitectureSpec`: Llama's, with Phi-3's weight rules and window."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..llama import LlamaArchConfig
from ..llama.spec import llama_spec
from .weights import safetensors_rules

ARCHITECTURE = "Phi3ForCausalLM"


def config_from_hf(hf_config: Any) -> LlamaArchConfig:
    """Llama's config of a Phi-3 ``config.json`` (which checks every field, ``sliding_window`` included), named
    ``Phi3ForCausalLM`` even when the config lists no ``architectures``, with ``sliding_window`` on every layer:
    transformers' ``Phi3Model`` masks all of them with it when it is set."""
    config = LlamaArchConfig.from_hf(hf_config)
    window = getattr(hf_config, "sliding_window", None) or 0
    return dataclasses.replace(config, architecture=ARCHITECTURE, sliding_windows=(window,) * config.num_layers)


SPEC = llama_spec("phi3", (ARCHITECTURE,), config_from_hf=config_from_hf,
                  weight_rules={"safetensors": safetensors_rules})
