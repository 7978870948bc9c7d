"""Llama-family configuration: a Hugging Face config (or a GGUF file's metadata) to :class:`LlamaArchConfig`.

One config class serves ``LlamaForCausalLM`` (SmolLM2, TinyLlama, Llama 2 and 3), ``MistralForCausalLM``
(sliding window) and ``Qwen2ForCausalLM`` (q/k/v bias): they differ only in the fields read here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...nn.rotary import RopeScaling

# HF ``architectures`` names this family builds, and the ``model_type`` each comes with.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# GGUF ``general.architecture`` -> HF class (llama.cpp writes Mistral 7B as "llama").
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class LlamaArchConfig:
    """Everything the graph builder needs, with HF's defaults resolved."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_act: str
    sliding_windows: tuple[int, ...]  # per layer; 0 = full attention
    partial_rotary_factor: float = 1.0
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf_config: Any) -> "LlamaArchConfig":
        arch = (getattr(hf_config, "architectures", None) or [None])[0] or {
            v: k for k, v in ARCHITECTURES.items()}.get(hf_config.model_type, "LlamaForCausalLM")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        rope = getattr(hf_config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        scaling = RopeScaling.from_hf(rope if rope else getattr(hf_config, "rope_scaling", None))
        num_layers = hf_config.num_hidden_layers
        eos = hf_config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf_config, "attention_bias", arch == "Qwen2ForCausalLM")),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            hidden_act=getattr(hf_config, "hidden_act", "silu"),
            sliding_windows=_sliding_windows(hf_config, num_layers),
            partial_rotary_factor=float(rope.get("partial_rotary_factor",
                                                 getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0)),
            eos_token_ids=eos_ids,
            bos_token_id=hf_config.bos_token_id,
        )


def _sliding_windows(hf_config: Any, num_layers: int) -> tuple[int, ...]:
    """Per-layer window, as transformers decides it for each of the three architectures."""
    window = getattr(hf_config, "sliding_window", None) or 0
    layer_types = getattr(hf_config, "layer_types", None)
    if hf_config.model_type == "qwen2":
        if not getattr(hf_config, "use_sliding_window", False):
            return (0,) * num_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else 0 for t in layer_types)
    if hf_config.model_type == "mistral":
        return (window,) * num_layers
    return (0,) * num_layers


def hf_config_from_gguf(metadata: Any, tensor_names: list[str]):
    """A transformers config built from a GGUF file's metadata (no torch needed, unlike transformers' own)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    gguf_arch = metadata("general.architecture")
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {gguf_arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}")

    def key(name: str, default: Any = None) -> Any:
        return metadata(f"{gguf_arch}.{name}", default)

    num_heads = key("attention.head_count")
    hidden = key("embedding_length")
    head_dim = key("attention.key_length") or hidden // num_heads
    tokens = metadata("tokenizer.ggml.tokens") or []
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    scaling_type = key("rope.scaling.type")
    if scaling_type == "linear":
        rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    kwargs = dict(
        vocab_size=key("vocab_size") or len(tokens),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=key("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=key("context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata("tokenizer.ggml.padding_token_id"),
        rope_parameters=rope,
    )
    architecture = GGUF_ARCHITECTURES[gguf_arch]
    config_class = {"LlamaForCausalLM": LlamaConfig, "MistralForCausalLM": MistralConfig,
                    "Qwen2ForCausalLM": Qwen2Config}[architecture]
    if architecture == "MistralForCausalLM":
        kwargs["sliding_window"] = key("attention.sliding_window")
    config = config_class(**kwargs)
    config.architectures = [architecture]
    return config
