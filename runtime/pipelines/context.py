"""Per-request state: the tokens so far, what the KV cache already holds, sampling and stop rules."""
from __future__ import annotations

import enum
import math
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
    # The prompt's log probabilities too (OpenAI completions' ``echo`` with ``logprobs``; vLLM's name): None is off,
    # n >= 0 the token's own and the n most likely at each prompt position. The prompt is then computed one token
    # per step (each step's logits are the next position's), next to the other requests of the batch.
    prompt_logprobs: int | None = None
    # Penalties against repeating (vLLM's / OpenAI's names and meanings; sampling.apply_penalties applies them).
    # repetition_penalty: HF's, on every token of the prompt and output: a logit l becomes l / r if l > 0, else
    # l * r (1.0 is off; above 1 discourages repeats). frequency_penalty / presence_penalty: OpenAI's, on the
    # output so far: l -= frequency * count(token) + presence * (count(token) > 0) (0.0 is off).
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):  # NaN compares False with everything: checked, not assumed
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0 (or None: off), got {self.prompt_logprobs}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):  # also rejects NaN
            raise ValueError(f"repetition_penalty must be > 0 (1.0 is off, above 1 discourages repeats), "
                             f"got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (0 is off, positive discourages repeats), got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (only then does a request keep :class:`TokenCounts`)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


class TokenCounts:
    """A request's distinct tokens (prompt and output) and how many times the output holds each.

    This is what the penalties read. It is kept incrementally in two aligned arrays (``ids``,
    ``output_counts``), so that applying the penalties costs O(distinct tokens) per step and never walks the
    history; appending a token is a dict look-up. Only requests with a penalty on keep one.
    """

    def __init__(self, prompt_tokens: list[int]):
        self._slots: dict[int, int] = {}
        capacity = 16
        self._ids = np.empty(capacity, np.int64)
        self._output = np.zeros(capacity, np.int64)
        for token in prompt_tokens:
            self._slot(int(token))

    def _slot(self, token: int) -> int:
        slot = self._slots.get(token)
        if slot is None:
            slot = len(self._slots)
            if slot == len(self._ids):  # doubling: amortized O(1) per new token
                self._ids = np.concatenate([self._ids, np.empty_like(self._ids)])
                self._output = np.concatenate([self._output, np.zeros_like(self._output)])
            self._ids[slot], self._output[slot] = token, 0
            self._slots[token] = slot
        return slot

    def add_output(self, token: int) -> None:
        slot = self._slot(int(token))  # first: it may replace the arrays
        self._output[slot] += 1

    @property
    def ids(self) -> np.ndarray:
        """Each distinct token of the prompt and output once (a view)."""
        return self._ids[:len(self._slots)]

    @property
    def output_counts(self) -> np.ndarray:
        """How many times the output holds each of :attr:`ids` (0 for prompt-only tokens; a view)."""
        return self._output[:len(self._slots)]


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
        self.token_counts = TokenCounts(self.prompt_tokens) if self.sampling.penalized else None
        # One entry per prompt token when ``sampling.prompt_logprobs`` asks (None for the first, which nothing
        # predicts); filled by the model runner as the prompt is computed.
        self.prompt_log_probabilities: list[dict | None] = [None] if self.sampling.prompt_logprobs is not None else []
        # Speculative decoding: tokens a drafter proposes to follow ``tokens`` (runtime/speculative/). They are not
        # part of the sequence: the scheduler may give a decoding row room for them, the model runner computes them
        # after the pending token and keeps those that verification accepts.
        self.draft_tokens: list[int] = []

    @property
    def active_idx(self) -> int:
        return len(self.tokens)

    @property
    def pending_tokens(self) -> list[int]:
        return self.tokens[self.start_idx:]

    def step_tokens(self, count: int) -> list[int]:
        """The ``count`` tokens a model call computes from ``start_idx``: known tokens, then draft tokens."""
        known = self.tokens[self.start_idx:self.start_idx + count]
        return known + self.draft_tokens[:count - len(known)]

    @property
    def max_chunk(self) -> int | None:
        """The most tokens one model call may compute for this request: 1 while its prompt's log probabilities
        are being collected (each call's logits are then the next prompt position's), else no limit."""
        if self.sampling.prompt_logprobs is not None and self.start_idx < len(self.prompt_tokens) - 1:
            return 1
        return None

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
        if self.token_counts is not None:
            self.token_counts.add_output(token)
        stops = set(self.sampling.stop_token_ids)
        if not self.sampling.ignore_eos:
            stops |= self.eos_token_ids
        if int(token) in stops:
            self.finish_reason = FinishReason.STOP
        elif self.token_budget <= 0:
            self.finish_reason = FinishReason.LENGTH
