"""Tokenizers: exporting one into an artifact (compile time) and using it (run time).

Run time needs only transformers' tokenizer classes (no torch): :class:`TextTokenizer` loads the
artifact's ``tokenizer/`` folder. For a GGUF source the tokenizer is rebuilt from the file's vocabulary
by transformers' own GGUF conversion; the metadata is read by ember's GGUF reader because
transformers' GGUF metadata reader imports torch.

A model folder is someone else's files. transformers is always called with ``trust_remote_code=False``, so an
``auto_map`` pointing ``AutoTokenizer`` at the folder's own Python is refused, never imported, and never asked
about on a terminal; every tokenizer file that cannot be read is one ValueError naming it; and the chat
template is compiled and rendered once, within bounds (:mod:`.chat_template`), when the tokenizer is exported
or loaded, so a broken template fails then, not at the first chat request.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .chat_template import ChatTemplate
from .model_source import ModelSource

logger = logging.getLogger(__name__)

_SPECIAL_TOKEN_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                       "pad_token": "padding_token_id"}
# Files any one of which lets transformers build a tokenizer without the model's own code.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt",
                   "vocab.json", "tekken.json", "tiktoken.model")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def read_json(file: Path) -> Any:
    """A JSON file's value; a ValueError naming the file if it is not valid JSON."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"{file}: not valid JSON ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


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
    tokens = tokenizer_dict.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{source.path}: GGUF metadata tokenizer.ggml.tokens is missing or not a list of strings: "
                         f"the file has no tokenizer")
    for name, key in _SPECIAL_TOKEN_KEYS.items():
        token_id = metadata(f"tokenizer.ggml.{key}")
        if token_id is None:
            continue
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < len(tokens):
            raise ValueError(f"{source.path}: GGUF metadata tokenizer.ggml.{key} {token_id!r} is not a token id "
                             f"below the {len(tokens)} tokens")
        tokenizer_config[name] = tokens[token_id]
    try:
        backend, extra = convert_gguf_tokenizer(metadata("general.architecture"), tokenizer_dict)
        tokenizer_config.update(extra)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)
    except Exception as error:  # noqa: BLE001 (transformers' conversion of a vocabulary from the file)
        raise ValueError(f"{source.path}: cannot build the tokenizer from its GGUF metadata "
                         f"({type(error).__name__}: {_first_line(error)})") from error


def _hf_tokenizer(directory: Path):
    """The model folder's tokenizer through transformers, never running the folder's own code."""
    from transformers import AutoTokenizer

    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{directory} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); ember needs "
                         f"the model's tokenizer next to its config.json")
    config_file = directory / "tokenizer_config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 (transformers on files from anyone: one line, traceback at -vv)
        if auto_map and "trust_remote_code" in str(error):
            raise ValueError(f"{config_file}: auto_map points the tokenizer at the model folder's own Python code "
                             f"({json.dumps(auto_map)[:120]}); ember never runs a model's code "
                             f"(trust_remote_code=False)") from error
        raise ValueError(f"{directory}: cannot load the tokenizer ({type(error).__name__}: "
                         f"{_first_line(error)})") from error


def _template_origin(directory: Path) -> Path:
    """The file a folder's chat template comes from (transformers' order of preference)."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (directory / name).is_file():
            return directory / name
    return directory / "tokenizer_config.json"


def _check_chat_template(tokenizer: Any, origin: str) -> None:
    """Compile every chat template the tokenizer has and render the default one once (a ChatTemplateError, a
    ValueError naming ``origin``, if one does not compile, raises, or passes a bound)."""
    templates = tokenizer.chat_template
    if templates is None:
        return
    if not isinstance(templates, dict):
        templates = {"default": templates}
    specials = {name: getattr(tokenizer, name, None) for name in SPECIAL_TOKENS}
    for name, template in templates.items():
        checked = ChatTemplate(template, origin if name == "default" else f"{origin} (template {name!r})")
        if name == "default":
            checked.check(**specials)


def load_source_tokenizer(source: ModelSource) -> Any:
    """The transformers tokenizer of a GGUF file or a model folder, its chat template checked."""
    if source.kind == "gguf":
        tokenizer = _gguf_tokenizer(source)
        origin = f"{source.path} (tokenizer.chat_template)"
    else:
        tokenizer = _hf_tokenizer(source.path)
        origin = str(_template_origin(source.path))
    _check_chat_template(tokenizer, origin)
    return tokenizer


def check_tokenizer(source: ModelSource) -> None:
    """Everything :func:`export_tokenizer` would refuse, without writing anything: for the compile path to call
    before it builds a graph, so that a model without a usable tokenizer costs no compile."""
    load_source_tokenizer(source)


def export_tokenizer(source: ModelSource, dest: Path, hf_config: Any) -> None:
    """Write the tokenizer, its chat template and the generation config into ``dest``."""
    from transformers import GenerationConfig

    tokenizer = load_source_tokenizer(source)
    if source.kind == "gguf":
        generation = GenerationConfig(bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
                                      pad_token_id=getattr(hf_config, "pad_token_id", None))
    elif (source.path / "generation_config.json").is_file():
        file = source.path / "generation_config.json"
        read_json(file)
        try:
            generation = GenerationConfig.from_pretrained(source.path)
        except Exception as error:  # noqa: BLE001 (transformers' own checks of the values)
            raise ValueError(f"{file}: {type(error).__name__}: {_first_line(error)}") from error
    else:
        generation = GenerationConfig.from_model_config(hf_config)
    dest.mkdir(parents=True, exist_ok=True)
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
        """What is left at the end of the stream. Bytes of a character the generation stopped inside (a length
        limit cut a multi-byte sequence) decode to U+FFFD; they are dropped, not printed as a replacement
        character, since no later token will complete them."""
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        self.prefix = self.read = len(self.tokens)
        return text[len(before):].rstrip("\ufffd")


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
        try:
            self.backend = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        except Exception as error:  # noqa: BLE001 (the tokenizers library raises plain Exception)
            raise ValueError(f"{self.directory / 'tokenizer.json'}: not a tokenizer ({_first_line(error)})") from None
        # tokenizer.json may carry a fixed truncation/padding (all-MiniLM-L6-v2's: 128 and pad to 128);
        # ember pads per batch and truncates at the model's limit itself.
        self.backend.no_truncation()
        self.backend.no_padding()
        config_file = self.directory / "tokenizer_config.json"
        self.config = read_json(config_file) if config_file.exists() else {}
        if not isinstance(self.config, dict):
            raise ValueError(f"{config_file}: not a JSON object")
        template_file = self.directory / "chat_template.jinja"
        template: Any  # the config's value: a string, a list of named templates, or anything a broken file holds
        if template_file.exists():
            template, origin = template_file.read_text(encoding="utf-8", errors="replace"), template_file
        else:
            template, origin = self.config.get("chat_template"), config_file
        if isinstance(template, list):  # named templates: use the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        self.chat_template: str | None = template or None
        self._template = ChatTemplate(template, str(origin)) if template else None  # syntax errors now
        generation_file = self.directory / "generation_config.json"
        self.generation_config = read_json(generation_file) if generation_file.exists() else {}
        if not isinstance(self.generation_config, dict):
            raise ValueError(f"{generation_file}: not a JSON object")
        eos = self.generation_config.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{generation_file}: eos_token_id {eos!r} is not a token id or a list of them")
        eos_id = self.token_id(self.special_token("eos_token"))
        if eos_id is not None:
            ids.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(int(i) for i in ids)

    def special_token(self, name: str) -> str | None:
        value = self.config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

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
        """The conversation as the chat template writes it; a ChatTemplateError (a ValueError naming the template's
        file) if the template raises or passes its bounds."""
        if self._template is None:
            raise ValueError(f"the tokenizer in {self.directory} has no chat template")
        specials = {k: self.special_token(k) for k in SPECIAL_TOKENS}
        return self._template.render(messages, add_generation_prompt, **specials)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation rendered by the model's chat template."""
        # The template writes any BOS itself; adding special tokens again would double it.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)
