"""Drafters: where speculative tokens come from.

:class:`NgramDrafter` (prompt lookup): the continuation of the latest earlier occurrence of the sequence's last
``n`` tokens, for ``n`` from ``max_n`` down to ``min_n``. It costs no model call, and pays off where the output
copies its input (summarising, rewriting or extracting from a given passage, code edits).

:class:`DraftModelDrafter`: a small decoder sharing the target's tokenizer proposes greedily, on its own paged
KV cache kept in step with the target's: after verification its cache is truncated to the accepted tokens.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..pipelines.context import TextContext

logger = logging.getLogger(__name__)


class Drafter(Protocol):
    """Proposes draft tokens for decoding contexts, and hears what verification kept."""

    def propose(self, requests: Sequence[tuple[TextContext, int]]) -> list[list[int]]:
        """Up to ``k`` draft tokens to follow each context's tokens, per ``(context, k)``."""
        ...

    def accepted(self, context: TextContext) -> None:
        """Verification of the context's drafts is done (its tokens are final up to ``active_idx``)."""
        ...

    def release(self, request_id: str) -> None:
        """The request left (finished, cancelled, preempted): drop anything held for it."""
        ...


class NgramDrafter:
    """Prompt-lookup drafting (see the module docstring); ``window``: how many trailing tokens are searched.

    ``min_n = 2``: a single-token match proposes on most steps of free-form text and is mostly rejected (on
    SmolLM2's answers to the benchmark's free prompts, 20 % of drafts accepted at n >= 1 against 54 % at n >= 2,
    for nearly the same tokens per step); see BENCHMARKS.md, speculative decoding."""

    def __init__(self, min_n: int = 2, max_n: int = 5, window: int = 4096):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n, self.window = min_n, max_n, window

    def propose(self, requests: Sequence[tuple[TextContext, int]]) -> list[list[int]]:
        return [self.lookup(ctx.tokens, k) if k > 0 else [] for ctx, k in requests]

    def lookup(self, tokens: Sequence[int], k: int) -> list[int]:
        """The ``k`` tokens after the latest earlier match of the longest suffix n-gram (empty if none)."""
        history = np.asarray(tokens[-self.window:], dtype=np.int64)
        size = len(history)
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            suffix = history[size - n:]
            # starts of earlier n-grams equal to the suffix (the suffix itself excluded)
            windows = np.lib.stride_tricks.sliding_window_view(history[:size - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return history[start:start + k].tolist()
        return []

    def accepted(self, context: TextContext) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass


class DraftModelDrafter:
    """Greedy proposals of a draft decoder (a ``DecoderPipelineModel`` with a paged cache, prefix caching off).

    Per step: the draft model computes the tokens the target accepted since it last ran (one row per context,
    in one call) and proposes its first draft, then one call per further draft token. ``accepted`` truncates
    its cache to the context's final tokens, so rejected proposals leave no K/V behind."""

    def __init__(self, model):
        self.model = model  # DecoderPipelineModel (not imported: it sits above this package)
        self._shadows: dict[str, TextContext] = {}
        self._final: dict[str, int] = {}  # per request, how many leading shadow tokens are known to be final

    def _shadow(self, context: TextContext) -> TextContext:
        shadow = self._shadows.get(context.request_id)
        if shadow is None:
            shadow = TextContext(list(context.prompt_tokens), context.max_length, request_id=context.request_id)
            self.model.claim(shadow)
            self._shadows[context.request_id] = shadow
        # follow the target's final tokens: keep the cached prefix they share (compared past what was final before)
        cached = shadow.start_idx
        final = context.tokens
        same = min(cached, self._final.get(context.request_id, 0))
        limit = min(cached, len(final))
        while same < limit and shadow.tokens[same] == final[same]:
            same += 1
        if same < cached:
            self.model.kv_manager.truncate(context.request_id, same)
        shadow.tokens = list(final)
        shadow.start_idx = same
        self._final[context.request_id] = len(final)
        return shadow

    def propose(self, requests: Sequence[tuple[TextContext, int]]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        live = [(i, self._shadow(ctx), k) for i, (ctx, k) in enumerate(requests) if k > 0]
        for step in range(max((k for _, _, k in live), default=0)):
            rows = [(i, shadow) for i, shadow, k in live if k > step]
            model_rows = []
            for _, shadow in rows:
                count = len(shadow.tokens) - shadow.start_idx
                if not self.model.reserve(shadow, count):
                    raise RuntimeError(f"the draft model's KV cache is full (request {shadow.request_id})")
                model_rows.append((shadow, count))
            logits = self.model.execute_rows(model_rows)
            for row, ((i, shadow), (_, count)) in enumerate(zip(rows, model_rows)):
                shadow.start_idx += count
                token = int(np.argmax(logits[row]))
                shadow.tokens.append(token)
                drafts[i].append(token)
        return drafts

    def accepted(self, context: TextContext) -> None:
        pass  # the next proposal truncates to the common prefix (see _shadow)

    def release(self, request_id: str) -> None:
        self._final.pop(request_id, None)
        if self._shadows.pop(request_id, None) is not None:
            self.model.release(request_id)
