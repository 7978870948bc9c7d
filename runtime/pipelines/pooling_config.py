"""How a sentence-transformers model turns token states into one vector (its ``modules.json``).

``1_Pooling/config.json`` (or whichever folder ``modules.json`` names for the Pooling module) gives the
mode; a ``Normalize`` module means L2 normalization; ``sentence_bert_config.json``'s ``max_seq_length`` is
where sentence-transformers truncates. A plain checkpoint without this configuration is mean-pooled and
not normalized, as the embeddings issue asks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
          "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class PoolingConfig:
    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None

    @classmethod
    def from_model_dir(cls, directory: str | Path) -> "PoolingConfig":
        directory = Path(directory)
        modules_file = directory / "modules.json"
        max_seq_length = None
        bert_config = directory / "sentence_bert_config.json"
        if bert_config.is_file():
            max_seq_length = json.loads(bert_config.read_text()).get("max_seq_length")
        if not modules_file.is_file():
            return cls(max_seq_length=max_seq_length)
        modules = json.loads(modules_file.read_text())
        mode, normalize = "mean", False
        for module in modules:
            kind = module.get("type", "")
            if kind.endswith(".Pooling"):
                config_file = directory / module.get("path", "") / "config.json"
                config = json.loads(config_file.read_text()) if config_file.is_file() else {}
                chosen = [m for key, m in _MODES.items() if config.get(key)]
                if config.get("pooling_mode_mean_sqrt_len_tokens") or len(chosen) > 1:
                    raise ValueError(f"{config_file}: pooling {config} is not supported; supported: one of "
                                     f"{', '.join(_MODES.values())}")
                mode = chosen[0] if chosen else "mean"
            elif kind.endswith(".Normalize"):
                normalize = True
        return cls(mode, normalize, max_seq_length)
