"""One object per architecture family holding every fact about it (DESIGN.md: architecture specs).

The compiler, the registry and the runtime ask a spec, never re-derive: the config from a Hugging Face config
or from GGUF metadata, the KV cache parameters, the maximum positions, the weight bytes per encoding, the
weight rules per checkpoint format, the GGUF architecture names and the graph builder. A spec is frozen data
whose fields are functions of the family's own typed config (``ArchConfig``: ``LlamaArchConfig``,
``BertArchConfig``, ...), as ``compiler/targets/ort_cpu.py`` is a target: a variant is a
``dataclasses.replace``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from ..nn.kv_cache import KVCacheParams, KVCacheStrategy
from ..options import GraphOptions
from ..weights.adapter import AdaptedWeights, WeightRule

#: A family's typed config (frozen dataclass); each spec's functions take its own.
ArchConfig = Any
#: ``(arch_config, checkpoint) -> rules``: checkpoint names to ember names for one weights format.
WeightRules = Callable[[ArchConfig, Any], list[WeightRule]]


@dataclass(frozen=True)
class ArchitectureSpec:
    """An architecture family (see the module docstring).

    ``hf_architectures``: the Hugging Face class names (``config.json``'s ``architectures``) it builds;
    ``gguf_architectures``: GGUF ``general.architecture`` -> Hugging Face class name (empty: no GGUF support);
    ``config_from_hf(hf_config)``: the typed config, a ValueError naming the file and field for a bad value;
    ``hf_config_from_gguf(metadata, tensor_names, path)``: a transformers config from a GGUF file's metadata;
    ``check_config_json(data, path)``: ``config.json``'s own content, before transformers fills in defaults;
    ``check_checkpoint(arch_config, weights)``: the adapted checkpoint holds the tensors the config describes;
    ``kv_params(arch_config, strategy, dtype, page_size)``: the KV cache's shape (None: no KV cache);
    ``max_positions(arch_config)``: the longest sequence the model takes;
    ``weight_bytes(arch_config, encoding)``: bytes the weights take in an encoding;
    ``weight_rules``: per weights format (``"safetensors"``, ``"gguf"``), the rules for a checkpoint;
    ``build_graph(arch_config, weights, options)``: the high-level graph from the adapted checkpoint.
    """

    name: str
    hf_architectures: tuple[str, ...]
    config_from_hf: Callable[[Any], ArchConfig]
    check_config_json: Callable[[Any, str | Path], None]
    build_graph: Callable[[ArchConfig, AdaptedWeights, GraphOptions], ir.Model]
    weight_rules: Mapping[str, WeightRules]
    max_positions: Callable[[ArchConfig], int]
    weight_bytes: Callable[[ArchConfig, str], int]
    kv_params: Callable[[ArchConfig, KVCacheStrategy, str, int], KVCacheParams | None] = \
        lambda config, strategy, dtype, page_size: None
    check_checkpoint: Callable[[ArchConfig, AdaptedWeights], None] = lambda config, weights: None
    gguf_architectures: Mapping[str, str] = field(default_factory=dict)
    hf_config_from_gguf: Callable[[Any, list[str], str | Path], Any] | None = None

    @property
    def weights_formats(self) -> tuple[str, ...]:
        return tuple(self.weight_rules)

    def adapt(self, config: ArchConfig, checkpoint: Any, weights_format: str,
              rules: Mapping[str, WeightRules] | None = None) -> AdaptedWeights:
        """The checkpoint under ember's names (``rules``: a registry entry's override of :attr:`weight_rules`)."""
        table = self.weight_rules if rules is None else rules
        if weights_format not in table:
            raise ValueError(f"{self.name}: weights format {weights_format!r} is not supported; "
                             f"supported: {', '.join(table)}")
        return AdaptedWeights(checkpoint, table[weights_format](config, checkpoint))

    def build(self, hf_config: Any, checkpoint: Any, weights_format: str, options: GraphOptions,
              rules: Mapping[str, WeightRules] | None = None) -> ir.Model:
        """Config, weight rules, checkpoint check and graph, in that order: the whole path from a checkpoint."""
        config = self.config_from_hf(hf_config)
        weights = self.adapt(config, checkpoint, weights_format, rules)
        self.check_checkpoint(config, weights)
        return self.build_graph(config, weights, options)
