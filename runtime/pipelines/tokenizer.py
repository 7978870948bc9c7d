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
    """Turns a growing list of token ids into text deltas, in O(1) decoding work per token.

    Only a short window is decoded each time (from ``prefix`` to the end), as vLLM and TGI do: the text of
    ``tokens[prefix:read]`` is already emitted, so the delta is what decoding ``tokens[prefix:]`` adds to it.
    A delta ending in an incomplete UTF-8 sequence is held back until the next token completes it;
    :meth:`flush` emits whatever remains at the end.
    """

    def __init__(self, tokenizer: "TextTokenizer"):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token_ids: Iterable[int]) -> str:
        self.tokens.extend(int(t) for t in token_ids)
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before):]

    def flush(self) -> str:
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        self.prefix = self.read = len(self.tokens)
        return text[len(before):]


def _chat_environment():
    """A sandboxed jinja2 environment with the helpers Hugging Face chat templates use."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class TextTokenizer:
    """The artifact's tokenizer: encode, decode, chat template and the ids that end generation.

    Built on ``tokenizers`` and ``jinja2`` alone (no transformers import at run time, which costs seconds):
    ``tokenizer.json`` as transformers saved it carries the special-token post-processing, and the chat
    template is rendered the way transformers renders it.
    """

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        if not (self.directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{self.directory} has no tokenizer.json")
        self.backend = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        # tokenizer.json may carry a fixed truncation/padding (all-MiniLM-L6-v2's: 128 and pad to 128);
        # ember pads per batch and truncates at the model's limit itself.
        self.backend.no_truncation()
        self.backend.no_padding()
        config_file = self.directory / "tokenizer_config.json"
        self.config = json.loads(config_file.read_text()) if config_file.exists() else {}
        template_file = self.directory / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else self.config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        generation_file = self.directory / "generation_config.json"
        self.generation_config = json.loads(generation_file.read_text()) if generation_file.exists() else {}
        eos = self.generation_config.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        eos_id = self.token_id(self.special_token("eos_token"))
        if eos_id is not None:
            ids.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(int(i) for i in ids)
        self._template = None

    def special_token(self, name: str) -> str | None:
        value = self.config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.special_token("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True,
                     max_length: int | None = None) -> list[list[int]]:
        """Token ids per text; with ``max_length``, longer texts are truncated (special tokens kept)."""
        if max_length is not None:
            self.backend.enable_truncation(max_length)
        try:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        finally:
            if max_length is not None:
                self.backend.no_truncation()

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError(f"the tokenizer in {self.directory} has no chat template")
        if self._template is None:
            self._template = _chat_environment().from_string(self.chat_template)
        specials = {k: self.special_token(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation rendered by the model's chat template."""
        # The template writes any BOS itself; adding special tokens again would double it.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)
