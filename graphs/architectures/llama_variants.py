"""What the Llama variants that reuse Llama's builder (Qwen 3, Gemma 2) add to it, written once for both:
:func:`variant_spec` (their spec from their config, their layer builder and the norms they add), the checkpoint
check and the byte count of the tensors Llama's own do not cover, and the ``o_proj`` bias.

Each variant adds 1-D norms per layer (Qwen 3's q/k norms, Gemma 2's sandwich norms), and transformers gives these
variants' ``o_proj`` a bias whenever ``attention_bias`` is set (Llama's builder follows Qwen 2, whose ``o_proj`` has
none). A missing or misshapen tensor is a ValueError naming the checkpoint, the tensor and the config field before
a graph is built, as ``llama.config.check_checkpoint`` makes it for the shared tensors.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from ..nn import Linear, Transformer
from ..options import GraphOptions
from ..weights.adapter import AdaptedWeights, WeightRule
from .llama.config import check_checkpoint as check_llama_checkpoint
from .llama.spec import decoder_weight_bytes, llama_spec
from .decoder_graph import build_decoder_graph
from .spec import ArchitectureSpec
from .weight_bytes import FLOAT32

#: ``(arch_config, weights, options) -> Transformer``: a variant's layers, ready to build.
TransformerBuilder = Callable[[Any, AdaptedWeights, GraphOptions], Transformer]


def variant_spec(name: str, architecture: str, *, config_from_hf: Callable[[Any], Any],
                 build_transformer: TransformerBuilder, layer_norms: tuple[str, ...], norm_field: str,
                 safetensors_rules: list[WeightRule]) -> ArchitectureSpec:
    """The spec of a variant (safetensors only: no GGUF architecture) whose layers ``build_transformer`` gives and
    whose checkpoint adds ``layer_norms`` (module paths in each layer) of the size of config field ``norm_field``
    to Llama's tensors; Llama's everything else."""

    def build_graph(config: Any, weights: AdaptedWeights, options: GraphOptions) -> ir.Model:
        return build_decoder_graph(build_transformer(config, weights, options), options, config.architecture)

    def check_checkpoint(config: Any, weights: AdaptedWeights) -> None:
        check_variant_checkpoint(config, weights, layer_norms, getattr(config, norm_field), norm_field)

    def weight_bytes(config: Any, encoding: str) -> int:
        return variant_weight_bytes(config, encoding, layer_norms, getattr(config, norm_field))

    return llama_spec(name, (architecture,), config_from_hf=config_from_hf, build_graph=build_graph,
                      check_checkpoint=check_checkpoint, weight_bytes=weight_bytes,
                      weight_rules={"safetensors": lambda config, checkpoint: safetensors_rules})


def check_variant_checkpoint(config: Any, weights: AdaptedWeights, layer_norms: tuple[str, ...], norm_size: int,
                             norm_meaning: str) -> None:
    """Llama's tensors; in every layer a ``[norm_size]`` weight for each of ``layer_norms`` (module paths such as
    ``self_attn.q_norm``; ``norm_meaning`` names the config field of the size) and, with ``attention_bias``, a
    ``[hidden_size]`` ``o_proj`` bias."""
    check_llama_checkpoint(config, weights)
    expected = {f"{module}.weight": (norm_size, norm_meaning) for module in layer_norms}
    if config.attention_bias:
        expected["self_attn.o_proj.bias"] = (config.hidden_size, "hidden_size")
    for i in range(config.num_layers):
        for tensor, (size, meaning) in expected.items():
            name = f"model.layers.{i}.{tensor}"
            if name not in weights:
                raise ValueError(f"{weights.source.path}: the checkpoint has no tensor {name}")
            if tuple(weights[name].shape) != (size,):
                raise ValueError(f"{weights.source.path}: tensor {name} has shape {list(weights[name].shape)}, "
                                 f"but the config's {meaning} is [{size}]")


def variant_weight_bytes(config: Any, encoding: str, layer_norms: tuple[str, ...], norm_size: int) -> int:
    """Llama's bytes in ``encoding``, and the float32 norms and ``o_proj`` biases of :func:`check_variant_checkpoint`."""
    vectors = len(layer_norms) * norm_size + (config.hidden_size if config.attention_bias else 0)
    return decoder_weight_bytes(config, encoding) + config.num_layers * vectors * FLOAT32


def bias_output_projections(transformer: Transformer, weights: AdaptedWeights, attention_bias: bool) -> None:
    """With ``attention_bias``, each layer's ``o_proj`` adds its checkpoint bias."""
    if not attention_bias:
        return
    for i, block in enumerate(transformer.layers):
        o_proj = block.self_attn.o_proj
        if not isinstance(o_proj, Linear):  # the builder's own layer, before any split
            raise TypeError(f"{o_proj.name} is a {type(o_proj).__name__}, not a Linear to give a bias")
        o_proj.bias_ref = weights[f"model.layers.{i}.self_attn.o_proj.bias"]
