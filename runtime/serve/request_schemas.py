"""The request bodies the server accepts (pydantic models), with OpenAI's names, defaults and ranges.

Ranges are checked here, so that a bad value is a 400 naming the field before any work starts (errors.py turns
pydantic's complaint into OpenAI's error body). Fields OpenAI defines that ember does not implement are refused
by name when they ask for something (``logit_bias``, ``suffix``, ``best_of`` other than ``n``, tools), never
silently ignored; unknown fields are ignored, as OpenAI's own server does. Extensions, as in vLLM: ``top_k``,
``repetition_penalty``, ``ignore_eos``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: At most this many stop strings (OpenAI's limit).
MAX_STOP_STRINGS = 4
#: At most this many alternatives per position in ``logprobs`` / ``top_logprobs``.
MAX_TOP_LOGPROBS = 20
#: At most this many choices per prompt.
MAX_CHOICES = 128


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What completions and chat completions share: how to sample and when to stop."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # extension; 0 and -1 mean all tokens
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)  # extension
    ignore_eos: bool = False  # extension: generate max_tokens tokens whatever the model says
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SamplingRequest:
        stops = self.stop_strings
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop: a stop string cannot be empty")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: one prompt (text or token ids) or a list of them."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: only best_of == n is supported (got best_of {self.best_of}, n {self.n})")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is allowed only with echo (scoring the prompt)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: an empty list")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text: a string, or its text parts joined (other kinds of part are refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        other = next((part.type for part in self.content if part.type != "text"), None)
        if other is not None:
            raise ValueError(f"messages: content parts of type {other!r} are not supported (text only)")
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``: a conversation, rendered by the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        if self.tools:
            raise ValueError("tools: not supported by this server")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format: only {'type': 'text'} is supported by this server")
        if self.max_tokens == 0:
            raise ValueError("max_tokens: must be at least 1")
        return self

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name) or ``max_tokens`` (the older one)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation as the chat template takes it (``developer`` is OpenAI's newer name for ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: one text or a list of texts."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    @model_validator(mode="after")
    def _check(self) -> EmbeddingRequest:
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input: an empty list")
        return self
