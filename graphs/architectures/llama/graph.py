"""The Llama-family decoder graph, assembled from ember's layers."""
from __future__ import annotations


from ...nn import (MLP, Attention, Embedding, KVCacheParams, KVCacheStrategy, Linear, ReturnLogits, RMSNorm,
                   RotaryEmbedding, TiedOutput, Transformer, TransformerBlock)
from ...nn.kv_cache import DEFAULT_PAGE_SIZE
from ...weights.adapter import AdaptedWeights
from .config import LlamaArchConfig



def kv_params(config: LlamaArchConfig, strategy: KVCacheStrategy = KVCacheStrategy.CONTINUOUS,
              dtype: str = "float32", page_size: int = DEFAULT_PAGE_SIZE) -> KVCacheParams:
    if page_size < 1:
        raise ValueError(f"page_size must be a positive number of tokens, not {page_size}")
    return KVCacheParams(dtype=dtype, n_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                         num_layers=config.num_layers, cache_strategy=KVCacheStrategy(strategy), page_size=page_size)


def build_transformer(config: LlamaArchConfig, weights: AdaptedWeights,
                      return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN,
                      strategy: KVCacheStrategy = KVCacheStrategy.CONTINUOUS,
                      page_size: int = DEFAULT_PAGE_SIZE) -> Transformer:
    """The layers of one Llama/Mistral/Qwen2 checkpoint (``page_size``: tokens per page of a PAGED cache)."""
    params = kv_params(config, strategy, page_size=page_size)

    # transformers gives o_proj a bias with attention_bias (Llama) but not Qwen2's q/k/v-only bias: the checkpoint says.
    def linear(path: str, bias: bool) -> Linear:
        return Linear(path, weights[f"{path}.weight"], weights[f"{path}.bias"] if bias else None)

    rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings, config.rope_scaling,
                           partial_rotary_factor=config.partial_rotary_factor)
    blocks = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        attention = Attention(
            f"{p}.self_attn",
            linear(f"{p}.self_attn.q_proj", config.attention_bias), linear(f"{p}.self_attn.k_proj", config.attention_bias),
            linear(f"{p}.self_attn.v_proj", config.attention_bias), linear(f"{p}.self_attn.o_proj", f"{p}.self_attn.o_proj.bias" in weights),
            num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, rope=rope,
            sliding_window=config.sliding_windows[i])
        mlp = MLP(f"{p}.mlp", linear(f"{p}.mlp.gate_proj", config.mlp_bias), linear(f"{p}.mlp.up_proj", config.mlp_bias),
                  linear(f"{p}.mlp.down_proj", config.mlp_bias), config.hidden_act)
        blocks.append(TransformerBlock(
            p, attention, mlp,
            RMSNorm(f"{p}.input_layernorm", weights[f"{p}.input_layernorm.weight"], config.rms_norm_eps),
            RMSNorm(f"{p}.post_attention_layernorm", weights[f"{p}.post_attention_layernorm.weight"],
                    config.rms_norm_eps)))

    embedding = Embedding("model.embed_tokens", weights["model.embed_tokens.weight"])
    output: Linear | TiedOutput
    if config.tie_word_embeddings or "lm_head.weight" not in weights:
        output = TiedOutput("lm_head", weights["model.embed_tokens.weight"])
    else:
        output = Linear("lm_head", weights["lm_head.weight"])
    return Transformer(config.hidden_size, config.num_heads, blocks,
                       RMSNorm("model.norm", weights["model.norm.weight"], config.rms_norm_eps), output, embedding,
                       params, rope, return_logits)
