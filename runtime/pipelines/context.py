"""Per-request state: the tokens so far, what the KV cache already holds, sampling and stop rules."""
from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` (or ``top_k == 1``) is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-sequence or stop token
    LENGTH = "length"  # max_new_tokens or the model's max length


@dataclass(eq=False)
class TextContext:
    """One generation request (``max.pipelines.TextContext``'s role).

    ``tokens[:start_idx]`` are in the KV cache; ``tokens[start_idx:active_idx]`` are what the next
    model call processes (the whole prompt at first, then the one token sampled last).
    """

    prompt_tokens: list[int]
    max_length: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if not self.prompt_tokens:
            raise ValueError("a prompt needs at least one token")
        if len(self.prompt_tokens) >= self.max_length:
            raise ValueError(f"the prompt has {len(self.prompt_tokens)} tokens; the model's maximum length is "
                             f"{self.max_length}, which leaves no room to generate")
        self.tokens: list[int] = list(self.prompt_tokens)
        self.start_idx = 0
        self.generated: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.rng = np.random.default_rng(self.sampling.seed)

    @property
    def active_idx(self) -> int:
        return len(self.tokens)

    @property
    def pending_tokens(self) -> list[int]:
        return self.tokens[self.start_idx:]

    @property
    def is_done(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_budget(self) -> int:
        """New tokens this request may still generate (model length and max_new_tokens)."""
        by_length = self.max_length - len(self.tokens)
        if self.sampling.max_new_tokens is not None:
            return min(by_length, self.sampling.max_new_tokens - len(self.generated))
        return by_length

    def append(self, token: int) -> None:
        """Record a sampled token and whether it ends the request."""
        self.tokens.append(int(token))
        self.generated.append(int(token))
        stops = set(self.sampling.stop_token_ids)
        if not self.sampling.ignore_eos:
            stops |= self.eos_token_ids
        if int(token) in stops:
            self.finish_reason = FinishReason.STOP
        elif self.token_budget <= 0:
            self.finish_reason = FinishReason.LENGTH
