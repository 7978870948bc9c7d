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


class RowModel(Protocol):
    """What the runner needs of a pipeline model (``DecoderPipelineModel`` implements it)."""

    def execute_rows(self, rows: Sequence[tuple[TextContext, int]]) -> np.ndarray: ...

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

    def __init__(self, model: RowModel):
        self.model = model

    def execute(self, rows: Sequence[tuple[TextContext, int]]) -> list[RowResult]:
        """Compute ``count`` tokens of each context from its ``start_idx`` (KV cache room already taken) and
        advance it: ``start_idx`` moves past the computed tokens, a sampled token is appended."""
        if not rows:
            return []
        logits = self.model.execute_rows(rows)
        finishing = [i for i, (ctx, count) in enumerate(rows) if ctx.start_idx + count == ctx.active_idx]
        contexts = [rows[i][0] for i in finishing]
        tokens = sample_contexts(logits[finishing], contexts) if finishing else np.empty(0, np.int64)
        top_n = [ctx.sampling.top_logprobs for ctx in contexts]
        logprobs = (self.model.compute_log_probabilities(None, ModelOutputs(next_token_logits=logits[finishing]),
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

    @staticmethod
    def _record_prompt_position(ctx: TextContext, count: int, logits: np.ndarray) -> None:
        """The log probability of the prompt token after this row's last position (requests that ask for their
        prompt's compute it one position per row; a position recomputed after preemption is not recorded twice)."""
        top_n = ctx.sampling.prompt_logprobs
        position = ctx.start_idx + count  # the prompt index these logits predict
        if top_n is None or position >= len(ctx.prompt_tokens) or len(ctx.prompt_log_probabilities) != position:
            return
        ctx.prompt_log_probabilities.append(token_log_probabilities(logits, ctx.prompt_tokens[position], top_n))
