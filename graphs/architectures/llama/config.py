"""Llama-family configuration: a Hugging Face config (or a GGUF file's metadata) to :class:`LlamaArchConfig`.

One config class serves ``LlamaForCausalLM`` (SmolLM2, TinyLlama, Llama 2 and 3), ``MistralForCausalLM``
(sliding window) and ``Qwen2ForCausalLM`` (q/k/v bias): they differ only in the fields read here.

Model files come from anyone, so every field is checked where it is read, before a graph is built: a
missing GGUF key, a count that is not a positive integer, heads that do not divide the hidden size, a
context length no model has, a layer count the tensors do not match are each a ``ValueError`` that names
the file and the field, instead of a ``TypeError`` here or an onnxruntime shape error after compiling.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config_json import check_required_fields
from ...nn.mlp import ACTIVATIONS
from ...nn.rotary import RopeScaling

# HF ``architectures`` names this family builds, and the ``model_type`` each comes with.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# GGUF ``general.architecture`` -> HF class (llama.cpp writes Mistral 7B as "llama").
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
#: The longest context a config may claim: above every released model's (Llama 4 Scout: 10,485,760), far below
#: 2**31 - 1, whose rotary table alone is gigabytes. The table has one row per position (graphs/nn/rotary.py).
MAX_POSITIONS = 1 << 24

#: config.json fields a graph cannot be built without. transformers fills a missing one with its class default
#: (32 heads, 32 layers, ...), which is some other model's: a graph of the wrong shape, or a wrong model that runs.
REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

logger = logging.getLogger(__name__)


def check_config_json(data: Any, path: str | Path) -> None:
    """``config.json``'s own content (before transformers fills in defaults): see :func:`check_required_fields`."""
    check_required_fields(data, path, REQUIRED_HF_FIELDS)


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
    max_position_embeddings: int  # the positions the model takes (longrope: fewer, see graphs/nn/rotary.py)
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
        """The config of a transformers config object; a ValueError naming its ``config.json`` and the field
        for a value no graph can be built from."""
        where = _config_file(hf_config)

        def count(name: str, value: Any = None, maximum: int | None = None) -> int:
            value = getattr(hf_config, name, None) if value is None else value
            return _positive_int(value, f"{where}: {name}", maximum)

        architectures = getattr(hf_config, "architectures", None)
        if architectures is not None and (not isinstance(architectures, list)
                                          or not all(isinstance(a, str) for a in architectures)):
            raise ValueError(f"{where}: architectures must be a list of class names, not {architectures!r}")
        arch = (architectures or [None])[0] or {
            v: k for k, v in ARCHITECTURES.items()}.get(str(getattr(hf_config, "model_type", "")), "LlamaForCausalLM")
        hidden = count("hidden_size")
        num_heads = count("num_attention_heads", maximum=hidden)
        num_kv_heads = count("num_key_value_heads", getattr(hf_config, "num_key_value_heads", None) or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{where}: num_attention_heads {num_heads} is not a multiple of "
                             f"num_key_value_heads {num_kv_heads}")
        if getattr(hf_config, "head_dim", None):
            head_dim = count("head_dim")
        elif hidden % num_heads:
            raise ValueError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {num_heads} "
                             f"(and there is no head_dim)")
        else:
            head_dim = hidden // num_heads
        if head_dim < 2:
            raise ValueError(f"{where}: head_dim {head_dim} (hidden_size {hidden} / num_attention_heads {num_heads}) "
                             f"leaves no room for rotary embeddings")
        rope = getattr(hf_config, "rope_parameters", None) or {}
        theta = _positive_number(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)),
                                 f"{where}: rope_theta")
        max_positions = count("max_position_embeddings", maximum=MAX_POSITIONS)
        try:
            scaling = RopeScaling.from_hf(rope if rope else getattr(hf_config, "rope_scaling", None), max_positions)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        partial = _positive_number(rope.get("partial_rotary_factor",
                                            getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0),
                                   f"{where}: partial_rotary_factor")
        if partial > 1 or int(head_dim * partial) < 2 or int(head_dim * partial) % 2:
            raise ValueError(f"{where}: partial_rotary_factor {partial} of head_dim {head_dim} is not an even "
                             f"number of rotary dimensions")
        try:
            scaling.check_rotary_dim(int(head_dim * partial))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if scaling.max_positions is not None and scaling.max_positions < max_positions:
            logger.warning("%s: rope scaling %r matches transformers up to original_max_position_embeddings %d "
                           "(beyond, transformers recomputes every position with other factors, which a KV cache "
                           "cannot follow): the model takes %d positions, not max_position_embeddings %d", where,
                           scaling.rope_type, scaling.max_positions, scaling.max_positions, max_positions)
            max_positions = scaling.max_positions
        num_layers = count("num_hidden_layers")
        hidden_act = getattr(hf_config, "hidden_act", "silu")
        if not isinstance(hidden_act, str) or hidden_act not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act {hidden_act!r} is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        eos, bos = getattr(hf_config, "eos_token_id", None), getattr(hf_config, "bos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        vocab = count("vocab_size")
        for name, ids in (("eos_token_id", eos_ids), ("bos_token_id", (bos,))):
            for token in ids:
                if token is not None and not (_is_int(token) and token >= 0):
                    raise ValueError(f"{where}: {name} {token!r} is not a token id")
                if token is not None and token >= vocab:  # never sampled: harmless, but not what was meant
                    logger.warning("%s: %s %d is not below vocab_size %d", where, name, token, vocab)
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=count("intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_positive_number(getattr(hf_config, "rms_norm_eps", None), f"{where}: rms_norm_eps"),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf_config, "attention_bias", arch == "Qwen2ForCausalLM")),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            hidden_act=hidden_act,
            sliding_windows=_sliding_windows(hf_config, num_layers, where),
            partial_rotary_factor=partial,
            eos_token_ids=eos_ids,
            bos_token_id=bos,
        )


def _config_file(hf_config: Any) -> str:
    """What to name in an error: the ``config.json`` a transformers config was read from, if known."""
    folder = getattr(hf_config, "name_or_path", None)
    return str(Path(folder) / "config.json") if folder else "model config"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any, what: str, maximum: int | None = None) -> int:
    """``value`` if it is an integer in ``1 .. maximum``; else a ValueError that starts with ``what``."""
    if value is None:
        raise ValueError(f"{what} is missing")
    if not _is_int(value) or value < 1:
        raise ValueError(f"{what} must be a positive integer, not {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{what} {value} is larger than {maximum:,}")
    return value


def _positive_number(value: Any, what: str) -> float:
    if value is None:
        raise ValueError(f"{what} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number, not {value!r}")
    return float(value)


def _sliding_windows(hf_config: Any, num_layers: int, where: str = "model config") -> tuple[int, ...]:
    """Per-layer window, as transformers decides it for each of the three architectures."""
    window = getattr(hf_config, "sliding_window", None) or 0
    if not _is_int(window) or window < 0:
        raise ValueError(f"{where}: sliding_window must be a non-negative integer, not {window!r}")
    layer_types = getattr(hf_config, "layer_types", None)
    if hf_config.model_type == "qwen2":
        if not getattr(hf_config, "use_sliding_window", False):
            return (0,) * num_layers
    if layer_types:
        if not isinstance(layer_types, (list, tuple)) or len(layer_types) != num_layers:
            raise ValueError(f"{where}: layer_types must list one type per layer ({num_layers}), "
                             f"not {layer_types!r:.80}")
        return tuple(window if t == "sliding_attention" else 0 for t in layer_types)
    if hf_config.model_type == "mistral":
        return (window,) * num_layers
    return (0,) * num_layers


def hf_config_from_gguf(metadata: Any, tensor_names: list[str], path: str | Path | None = None):
    """A transformers config built from a GGUF file's metadata (no torch needed, unlike transformers' own).

    ``metadata(key, default)`` answers the file's keys; ``path`` is the file, named in errors. Every key the
    graph needs is checked first: a ValueError names the file and the GGUF key that is missing or wrong."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    where = str(path) if path is not None else "GGUF file"
    gguf_arch = metadata("general.architecture")
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{where}: GGUF architecture {gguf_arch!r} is not supported; "
                         f"supported: {', '.join(GGUF_ARCHITECTURES)}")

    def key(name: str, default: Any = None) -> Any:
        return metadata(f"{gguf_arch}.{name}", default)

    def count(name: str, default: Any = None, maximum: int | None = None) -> int:
        return _positive_int(key(name, default), f"{where}: GGUF metadata {gguf_arch}.{name}", maximum)

    def number(name: str, default: float | None) -> float:  # None: the key is required
        return _positive_number(key(name, default), f"{where}: GGUF metadata {gguf_arch}.{name}")

    hidden = count("embedding_length")
    num_heads = count("attention.head_count", maximum=hidden)
    num_kv_heads = count("attention.head_count_kv", num_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"{where}: GGUF metadata {gguf_arch}.attention.head_count {num_heads} is not a multiple "
                         f"of {gguf_arch}.attention.head_count_kv {num_kv_heads}")
    if key("attention.key_length") is not None:
        head_dim = count("attention.key_length")
    elif hidden % num_heads:
        raise ValueError(f"{where}: GGUF metadata {gguf_arch}.embedding_length {hidden} is not a multiple of "
                         f"{gguf_arch}.attention.head_count {num_heads}")
    else:
        head_dim = hidden // num_heads
    if key("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{where}: GGUF metadata {gguf_arch}.attention.value_length "
                         f"{key('attention.value_length')!r} differs from the key length {head_dim}")
    num_layers = count("block_count")
    blocks = sorted({int(m.group(1)) for n in tensor_names if (m := re.match(r"blk\.(\d+)\.", n))})
    if blocks != list(range(num_layers)):
        found = f"blocks {blocks[0]}..{blocks[-1]}" if blocks else "no blk.* tensors"
        raise ValueError(f"{where}: GGUF metadata {gguf_arch}.block_count is {num_layers} but the file has "
                         f"{found} ({len(blocks)} blocks)")
    tokens = metadata("tokenizer.ggml.tokens") or []
    vocab = count("vocab_size", len(tokens) or None)
    for name in ("bos_token_id", "eos_token_id", "padding_token_id"):
        token = metadata(f"tokenizer.ggml.{name}")
        if token is not None and not (_is_int(token) and 0 <= token < vocab):
            raise ValueError(f"{where}: GGUF metadata tokenizer.ggml.{name} {token!r} is not a token id below the "
                             f"vocabulary size {vocab}")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": number("rope.freq_base", 10000.0)}
    scaling_type = key("rope.scaling.type")
    if scaling_type == "linear":
        rope.update(rope_type="linear", factor=number("rope.scaling.factor", None))
    elif scaling_type not in (None, "none"):
        raise ValueError(f"{where}: GGUF metadata {gguf_arch}.rope.scaling.type {scaling_type!r} is not supported; "
                         f"supported: none, linear")
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=count("feed_forward_length"),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-6),
        max_position_embeddings=count("context_length", 2048, maximum=MAX_POSITIONS),
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
        window = key("attention.sliding_window")
        if window is not None and not (_is_int(window) and window >= 0):
            raise ValueError(f"{where}: GGUF metadata {gguf_arch}.attention.sliding_window must be a non-negative "
                             f"integer, not {window!r}")
        kwargs["sliding_window"] = window
    config = config_class(**kwargs)
    config.architectures = [architecture]
    return config


def check_checkpoint(config: LlamaArchConfig, weights: Any) -> None:
    """The checkpoint holds the tensors ``config`` describes, in the shapes it describes (a ValueError naming the
    checkpoint, the field and the tensor if not).

    ``weights`` is the checkpoint seen through its adapter (``AdaptedWeights``: ember names, PyTorch shapes), so
    one check serves safetensors and GGUF. A layer count the tensors do not match would otherwise be a
    ``KeyError`` half-way through building the graph, and heads that do not fit the projections an onnxruntime
    shape error after compiling."""
    where = weights.source.path
    layers = sorted({int(m.group(1)) for n in weights.names() if (m := re.match(r"model\.layers\.(\d+)\.", n))})
    if layers != list(range(config.num_layers)):
        found = f"layers {layers[0]}..{layers[-1]}" if layers else "no model.layers.* tensors"
        raise ValueError(f"{where}: the config's num_hidden_layers is {config.num_layers} but the checkpoint has "
                         f"{found} ({len(layers)} layers)")
    h, q, kv, inter = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, \
        config.intermediate_size
    expected = {"model.embed_tokens.weight": ((config.vocab_size, h), "vocab_size x hidden_size"),
                "model.norm.weight": ((h,), "hidden_size")}
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        expected.update({
            f"{p}.self_attn.q_proj.weight": ((q, h), "num_attention_heads * head_dim x hidden_size"),
            f"{p}.self_attn.k_proj.weight": ((kv, h), "num_key_value_heads * head_dim x hidden_size"),
            f"{p}.self_attn.v_proj.weight": ((kv, h), "num_key_value_heads * head_dim x hidden_size"),
            f"{p}.self_attn.o_proj.weight": ((h, q), "hidden_size x num_attention_heads * head_dim"),
            f"{p}.mlp.gate_proj.weight": ((inter, h), "intermediate_size x hidden_size"),
            f"{p}.mlp.up_proj.weight": ((inter, h), "intermediate_size x hidden_size"),
            f"{p}.mlp.down_proj.weight": ((h, inter), "hidden_size x intermediate_size"),
            f"{p}.input_layernorm.weight": ((h,), "hidden_size"),
            f"{p}.post_attention_layernorm.weight": ((h,), "hidden_size")})
    if not config.tie_word_embeddings and "lm_head.weight" in weights:
        expected["lm_head.weight"] = ((config.vocab_size, h), "vocab_size x hidden_size")
    for name, (shape, meaning) in expected.items():
        if name not in weights:
            raise ValueError(f"{where}: the checkpoint has no tensor {name}")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{where}: tensor {name} has shape {list(weights[name].shape)}, but the config's "
                             f"{meaning} is {list(shape)}")
