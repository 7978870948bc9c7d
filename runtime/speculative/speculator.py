"""The speculative state between steps: a drafter, and a draft length per request from its acceptance rate."""
from __future__ import annotations

import enum
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from ..pipelines.context import TextContext
from .acceptance import AdaptiveDraftLength
from .drafters import Drafter

logger = logging.getLogger(__name__)


class SpeculativeMethod(str, enum.Enum):
    """Where draft tokens come from: ``ngram`` (prompt lookup, no model) or ``draft`` (a draft model)."""

    ngram = "ngram"
    draft = "draft"


@dataclass(frozen=True)
class SpeculativeConfig:
    """``num_speculative_tokens``: the most tokens drafted per step; ``adaptive``: draft fewer (down to none)
    when acceptance is low; ``verify_token_cost`` / ``step_overhead``: the cost model of acceptance.py, in
    decode steps."""

    method: SpeculativeMethod
    num_speculative_tokens: int = 4
    adaptive: bool = True
    verify_token_cost: float = 0.06
    step_overhead: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", SpeculativeMethod(self.method))
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")


@dataclass
class SpeculativeStats:
    """Counters over every verified row: drafted and accepted tokens, verification rows, tokens they emitted."""

    drafted: int = 0
    accepted: int = 0
    verify_rows: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Speculator:
    """Proposes drafts for decoding contexts after each step and records what verification kept."""

    def __init__(self, config: SpeculativeConfig, drafter: Drafter):
        self.config = config
        self.drafter = drafter
        self.stats = SpeculativeStats()
        # per context, dropped with it (a cancelled request's context is garbage, so is its controller)
        self._lengths: weakref.WeakKeyDictionary[TextContext, AdaptiveDraftLength] = weakref.WeakKeyDictionary()

    def controller(self, context: TextContext) -> AdaptiveDraftLength:
        length = self._lengths.get(context)
        if length is None:
            length = AdaptiveDraftLength(self.config.num_speculative_tokens, self.config.verify_token_cost,
                                         self.config.step_overhead, adaptive=self.config.adaptive)
            self._lengths[context] = length
        return length

    def record(self, context: TextContext, drafted: int, accepted: int, emitted: int) -> None:
        if drafted:
            self.controller(context).record(drafted, accepted)
            self.stats.drafted += drafted
            self.stats.accepted += accepted
            self.stats.verify_rows += 1
            self.stats.emitted += emitted
        self.drafter.accepted(context)

    def propose(self, contexts: Sequence[TextContext]) -> None:
        """Set ``draft_tokens`` of each context that decodes next (one pending token), none past its budget."""
        requests = []
        for ctx in contexts:
            ctx.draft_tokens = []
            if ctx.is_done:
                self.drafter.release(ctx.request_id)
                continue
            if ctx.active_idx - ctx.start_idx != 1:
                continue
            # a step emits at most drafts + 1 tokens: keep the drafts within max_new_tokens and the length limit
            k = min(self.controller(ctx).next_k(), ctx.token_budget - 1)
            if k > 0:
                requests.append((ctx, k))
        if not requests:
            return
        for (ctx, k), drafts in zip(requests, self.drafter.propose(requests)):
            ctx.draft_tokens = list(drafts[:k])

    def release(self, request_id: str) -> None:
        self.drafter.release(request_id)
