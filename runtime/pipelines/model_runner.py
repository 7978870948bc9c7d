"""The one stepping path: run scheduled rows on a decoder, sample, compute log probabilities, append.

Whoever decides what runs (the continuous-batching scheduler for the engine and ``TextGenerationPipeline.generate``,
``TextGenerationPipeline.next_token`` for MAX's step API) hands :meth:`ModelRunner.execute` rows of
``(context, tokens to compute)``; everything after the decision happens here once (vLLM v1's split between
scheduler and model runner). A row that computes its context's last known token samples the next one; a row
that computes only part of a prompt (a chunk) samples nothing, but records the next prompt token's log
probability when the request asks for its prompt's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .context import FinishReason, TextContext
from .interfaces import ModelOutputs
from .sampling import sample_contexts, token_log_probabilities
from ..speculative.speculator import Speculator
from ..speculative.verification import verify_and_append


class RowModel(Protocol):
    """What the runner needs of a pipeline model (``DecoderPipelineModel`` implements it)."""

    def execute_rows(self, rows: Sequence[tuple[TextContext, int]]) -> np.ndarray: ...

    def execute_rows_uncommitted(self, rows: Sequence[tuple[TextContext, int]],
                                 num_logits: Sequence[int]) -> tuple[list[np.ndarray], list[Any]]: ...

    def commit_rows(self, calls: Sequence[Any], keep: dict[str, int]) -> None: ...

    def compute_log_probabilities(self, model_inputs: Any, model_outputs: ModelOutputs, next_tokens: np.ndarray,
                                  batch_top_n: Sequence[int], batch_echo: Sequence[bool]) -> list[Any]: ...


@dataclass(frozen=True)
class RowResult:
    """What one row of a step produced: the sampled token (None for a prompt chunk), its log probabilities
    (when the request asks for ``top_logprobs``) and whether the request ended."""

    request_id: str
    num_tokens: int
    token: int | None
    log_probabilities: dict[str, Any] | None = None
    finish_reason: FinishReason | None = None


class ModelRunner:
    """Executes, samples, computes log probabilities and appends, for every caller (see the module docstring)."""

    def __init__(self, model: RowModel, speculator: Speculator | None = None):
        self.model = model
        self.speculator = speculator

    def execute(self, rows: Sequence[tuple[TextContext, int]]) -> list[RowResult]:
        """Compute ``count`` tokens of each context from its ``start_idx`` (KV cache room already taken) and
        advance it: ``start_idx`` moves past the computed tokens, a sampled token is appended.

        With a speculator, a decoding row's count may go past its known tokens into its ``draft_tokens``: the
        row is verified (several tokens may be appended, one result each) and new drafts are proposed."""
        if not rows:
            return []
        if self.speculator is not None:
            return self._execute_speculative(rows, self.speculator)
        logits = self.model.execute_rows(rows)
        finishing = [i for i, (ctx, count) in enumerate(rows) if ctx.start_idx + count == ctx.active_idx]
        contexts = [rows[i][0] for i in finishing]
        chosen = logits if len(finishing) == len(rows) else logits[finishing]  # a decode step: every row, no copy
        tokens = sample_contexts(chosen, contexts) if finishing else np.empty(0, np.int64)
        top_n = [ctx.sampling.top_logprobs for ctx in contexts]
        logprobs = (self.model.compute_log_probabilities(None, ModelOutputs(next_token_logits=chosen),
                                                         tokens, top_n, [False] * len(contexts))
                    if any(top_n) else [None] * len(contexts))
        sampled = {i: (int(t), lp) for i, t, lp in zip(finishing, tokens, logprobs)}
        results = []
        for i, (ctx, count) in enumerate(rows):
            self._record_prompt_position(ctx, count, logits[i])
            ctx.start_idx += count
            if i not in sampled:
                results.append(RowResult(ctx.request_id, count, None))
                continue
            token, lp = sampled[i]
            ctx.append(token)
            results.append(RowResult(ctx.request_id, count, token, lp, ctx.finish_reason))
        return results

    def _execute_speculative(self, rows: Sequence[tuple[TextContext, int]], speculator: Speculator) -> list[RowResult]:
        """The step with verification rows: one model call computing every row (logits at each row's last
        ``drafts + 1`` positions), verification per row (speculative/verification.py), then only the kept
        tokens' K/V committed; the rejected drafts' pages go back to the pool."""
        drafts = [max(0, ctx.start_idx + count - ctx.active_idx) for ctx, count in rows]
        logits, calls = self.model.execute_rows_uncommitted(rows, [d + 1 for d in drafts])
        keep: dict[str, int] = {}
        results: list[RowResult] = []
        decoding: list[TextContext] = []
        for (ctx, count), d, row_logits in zip(rows, drafts, logits):
            known = count - d
            self._record_prompt_position(ctx, known, row_logits[0])
            if ctx.start_idx + known < ctx.active_idx:  # a prompt chunk: nothing sampled
                ctx.start_idx += known
                keep[ctx.request_id] = known
                results.append(RowResult(ctx.request_id, count, None))
                continue
            tokens, accepted = verify_and_append(ctx, row_logits, ctx.draft_tokens[:d])
            speculator.record(ctx, d, accepted, len(tokens))
            keep[ctx.request_id] = known + accepted
            ctx.start_idx += known + accepted
            top_n = ctx.sampling.top_logprobs
            logprobs = (self.model.compute_log_probabilities(
                None, ModelOutputs(next_token_logits=row_logits[:len(tokens)]), np.array(tokens), [top_n] * len(tokens),
                [False] * len(tokens)) if top_n else [None] * len(tokens))
            for j, (token, lp) in enumerate(zip(tokens, logprobs)):
                last = j == len(tokens) - 1
                results.append(RowResult(ctx.request_id, count if j == 0 else 0, token, lp,
                                         ctx.finish_reason if last else None))
            decoding.append(ctx)
        self.model.commit_rows(calls, keep)
        speculator.propose(decoding)
        return results

    @staticmethod
    def _record_prompt_position(ctx: TextContext, count: int, logits: np.ndarray) -> None:
        """The log probability of the prompt token after this row's last position (requests that ask for their
        prompt's compute it one position per row; a position recomputed after preemption is not recorded twice)."""
        top_n = ctx.sampling.prompt_logprobs
        position = ctx.start_idx + count  # the prompt index these logits predict
        if top_n is None or position >= len(ctx.prompt_tokens) or len(ctx.prompt_log_probabilities) != position:
            return
        ctx.prompt_log_probabilities.append(token_log_probabilities(logits, ctx.prompt_tokens[position], top_n))
