"""Choosing next tokens from logits on the host: penalties, then greedy or temperature, top-k, top-p, seeded
per request.

Both stepping paths (``TextGenerationPipeline.next_token`` and the scheduler) call :func:`sample_contexts`,
so a sampling rule lives here once. Penalties change a copy of the rows that ask for them (the logits that
log probabilities report stay the model's), before the greedy choice or the temperature.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .context import SamplingParams, TextContext, TokenCounts


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64) - np.max(logits)
    return x - np.log(np.exp(x).sum())


def token_log_probabilities(logits: np.ndarray, token: int, top_n: int) -> dict[str, Any]:
    """The log probability of ``token`` under one row of logits and the ``top_n`` most likely tokens' (OpenAI's
    ``logprobs`` / ``top_logprobs``): the one place this dict is built, for generated and prompt tokens alike."""
    logp = log_softmax(logits)
    top = np.argsort(-logp, kind="stable")[:max(top_n, 0)]
    return {"token_log_probability": float(logp[int(token)]), "top": {int(t): float(logp[t]) for t in top}}


def sample_row(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from one row of logits."""
    if params.greedy:
        return int(np.argmax(logits))
    order, probs = candidate_distribution(logits, params)
    return int(order[rng.choice(len(order), p=probs)])


def candidate_distribution(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The distribution a non-greedy :func:`sample_row` draws from: candidate token ids, most likely first, and
    their probabilities after temperature, top-k and top-p. Speculative verification accepts against exactly
    this (runtime/speculative/verification.py)."""
    scaled = logits.astype(np.float64) / params.temperature
    candidates = np.arange(scaled.shape[0])
    if 0 < params.top_k < scaled.shape[0]:
        candidates = np.argpartition(-scaled, params.top_k - 1)[:params.top_k]
    order = candidates[np.argsort(-scaled[candidates], kind="stable")]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return order, probs


def apply_penalties(logits: np.ndarray, params: SamplingParams, counts: TokenCounts) -> np.ndarray:
    """A copy of one row of logits with ``params``' penalties applied (see :class:`SamplingParams`).

    Repetition (HF's ``RepetitionPenaltyLogitsProcessor``) on every token of the prompt and output, then
    frequency and presence (OpenAI's) from the output counts. Touches only ``counts.ids``: O(distinct
    tokens), in the logits' own dtype as transformers computes it.
    """
    row = np.array(logits, copy=True)
    ids = counts.ids
    if params.repetition_penalty != 1.0:
        seen = row[ids]
        row[ids] = np.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        output = counts.output_counts
        row[ids] -= (params.frequency_penalty * output + params.presence_penalty * (output > 0)).astype(row.dtype)
    return row


def sample(logits: np.ndarray, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator],
           token_counts: Sequence[TokenCounts | None] | None = None) -> np.ndarray:
    """Next tokens for a batch ``[batch, vocab]``; greedy rows without penalties take one vectorized argmax.

    ``token_counts`` (per row, None where no penalty applies) is what the penalties need; without it rows
    are sampled unpenalized."""
    tokens = np.argmax(logits, axis=-1).astype(np.int64)
    for row, (p, rng) in enumerate(zip(params, rngs)):
        counts = token_counts[row] if token_counts is not None else None
        if counts is not None and p.penalized:
            tokens[row] = sample_row(apply_penalties(logits[row], p, counts), p, rng)
        elif not p.greedy:
            tokens[row] = sample_row(logits[row], p, rng)
    return tokens


def sample_contexts(logits: np.ndarray, contexts: Sequence[TextContext]) -> np.ndarray:
    """Next tokens for rows ``[len(contexts), vocab]``, each by its context's sampling parameters, seeded
    generator and token counts: the one sampling entry point of both stepping paths."""
    return sample(logits, [c.sampling for c in contexts], [c.rng for c in contexts],
                  [c.token_counts for c in contexts])
