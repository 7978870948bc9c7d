"""Tokenizers: exporting one into an artifact (compile time) and using it (run time).

Run time needs only transformers' tokenizer classes (no torch): :class:`TextTokenizer` loads the
artifact's ``tokenizer/`` folder. For a GGUF source the tokenizer is rebuilt from the file's vocabulary
by transformers' own GGUF conversion; the metadata is read by ember's GGUF reader because
transformers' GGUF metadata reader imports torch.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .model_source import ModelSource

logger = logging.getLogger(__name__)

_SPECIAL_TOKEN_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                       "pad_token": "padding_token_id"}


def _gguf_tokenizer(source: ModelSource):
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                        convert_gguf_tokenizer)

    metadata = source.gguf.metadata
    grouped = {group: {name: metadata(f"tokenizer.{key}") for key, name in renames.items()
                       if metadata(f"tokenizer.{key}") is not None}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in _SPECIAL_TOKEN_KEYS.items():
        token_id = metadata(f"tokenizer.ggml.{key}")
        if token_id is not None:
            tokenizer_config[name] = tokens[token_id]
    backend, extra = convert_gguf_tokenizer(metadata("general.architecture"), tokenizer_dict)
    tokenizer_config.update(extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)


def export_tokenizer(source: ModelSource, dest: Path, hf_config: Any) -> None:
    """Write the tokenizer, its chat template and the generation config into ``dest``."""
    from transformers import AutoTokenizer, GenerationConfig

    dest.mkdir(parents=True, exist_ok=True)
    if source.kind == "gguf":
        tokenizer = _gguf_tokenizer(source)
        generation = GenerationConfig(bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
                                      pad_token_id=getattr(hf_config, "pad_token_id", None))
    else:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        try:
            generation = GenerationConfig.from_pretrained(source.path)
        except OSError:
            generation = GenerationConfig.from_model_config(hf_config)
    tokenizer.save_pretrained(dest)
    generation.save_pretrained(dest)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: "TextTokenizer", prompt_tokens: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = ""

    def add(self, token_ids: Iterable[int]) -> str:
        self.tokens.extend(int(t) for t in token_ids)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return delta


class TextTokenizer:
    """The artifact's tokenizer: encode, decode, chat template and the ids that end generation."""

    def __init__(self, directory: str | Path):
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        self.delegate = AutoTokenizer.from_pretrained(self.directory)
        generation_file = self.directory / "generation_config.json"
        generation = json.loads(generation_file.read_text()) if generation_file.exists() else {}
        eos = generation.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        if self.delegate.eos_token_id is not None:
            ids.add(self.delegate.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(int(i) for i in ids)
        self.generation_config = generation

    @property
    def vocab_size(self) -> int:
        return len(self.delegate)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.delegate.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.delegate.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.delegate, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation rendered by the model's chat template."""
        text = self.delegate.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # The template writes any BOS itself; adding special tokens again would double it.
        return self.encode(text, add_special_tokens=False)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)
