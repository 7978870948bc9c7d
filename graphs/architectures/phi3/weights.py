"""Phi-3 checkpoint names to ember (Llama) names: the fused projections split by rows."""
from __future__ import annotations

from typing import Any

from ...weights.adapter import RowRange, WeightRule
from ..llama import LlamaArchConfig
from ..llama.weights import SAFETENSORS_RULES

_LAYER, _TO_LAYER = r"(?:model\.)?layers\.(\d+)\.", r"model.layers.\1."


def safetensors_rules(config: LlamaArchConfig, checkpoint: Any = None) -> list[WeightRule]:
    """``qkv_proj`` is q, k and v stacked by rows, ``gate_up_proj`` gate then up (the slices transformers'
    ``Phi3Attention`` and ``Phi3MLP.chunk`` take); their row counts come from the config, and a checkpoint whose
    fused tensors have other row counts is refused by the adapter. Then Llama's rules (a checkpoint already
    unfused reads as Llama's)."""
    q, kv, inter = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    attention, mlp = _TO_LAYER + "self_attn.", _TO_LAYER + "mlp."
    return [
        WeightRule(_LAYER + r"self_attn\.qkv_proj\.weight", None, splits=(
            RowRange(attention + "q_proj.weight", 0, q), RowRange(attention + "k_proj.weight", q, q + kv),
            RowRange(attention + "v_proj.weight", q + kv, q + 2 * kv))),
        WeightRule(_LAYER + r"mlp\.gate_up_proj\.weight", None, splits=(
            RowRange(mlp + "gate_proj.weight", 0, inter), RowRange(mlp + "up_proj.weight", inter, 2 * inter))),
        *SAFETENSORS_RULES,
    ]
