"""Checkpoint names to ember (Hugging Face) names for the Llama family, per weights format."""
from __future__ import annotations

import numpy as np

from ...weights.adapter import WeightRule
from .config import LlamaArchConfig

SAFETENSORS_RULES = [
    WeightRule(r".*rotary_emb\.inv_freq", None),
    # Bare ``LlamaModel`` checkpoints name their modules without the ``model.`` prefix.
    WeightRule(r"(embed_tokens|layers|norm)\.(.*)", r"model.\1.\2"),
]


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (it interleaves each head's rotary halves for its rope kernel)."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_rules(config: LlamaArchConfig, gguf_architecture: str) -> list[WeightRule]:
    permuted = gguf_architecture in ("llama", "mistral")  # llama.cpp permutes Q/K for these, not for qwen2

    def q_transform(w, _match):
        return unpermute_rows(w, config.num_heads) if permuted and w.ndim == 2 else w

    def k_transform(w, _match):
        return unpermute_rows(w, config.num_kv_heads) if permuted and w.ndim == 2 else w

    layer = r"blk\.(\d+)\."
    to_layer = r"model.layers.\1."
    return [
        WeightRule(r"token_embd\.weight", "model.embed_tokens.weight"),
        WeightRule(r"output_norm\.weight", "model.norm.weight"),
        WeightRule(r"output\.weight", "lm_head.weight"),
        WeightRule(r"rope_freqs\.weight", None),
        WeightRule(layer + r"attn_norm\.weight", to_layer + "input_layernorm.weight"),
        WeightRule(layer + r"attn_q\.(weight|bias)", to_layer + r"self_attn.q_proj.\2", q_transform,
                   moves_rows=True),
        WeightRule(layer + r"attn_k\.(weight|bias)", to_layer + r"self_attn.k_proj.\2", k_transform,
                   moves_rows=True),
        WeightRule(layer + r"attn_v\.(weight|bias)", to_layer + r"self_attn.v_proj.\2"),
        WeightRule(layer + r"attn_output\.weight", to_layer + "self_attn.o_proj.weight"),
        WeightRule(layer + r"ffn_norm\.weight", to_layer + "post_attention_layernorm.weight"),
        WeightRule(layer + r"ffn_gate\.weight", to_layer + "mlp.gate_proj.weight"),
        WeightRule(layer + r"ffn_up\.weight", to_layer + "mlp.up_proj.weight"),
        WeightRule(layer + r"ffn_down\.weight", to_layer + "mlp.down_proj.weight"),
    ]
