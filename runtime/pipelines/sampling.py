"""Choosing next tokens from logits on the host: greedy, temperature, top-k, top-p, seeded per request."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .context import SamplingParams


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64) - np.max(logits)
    return x - np.log(np.exp(x).sum())


def sample_row(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from one row of logits."""
    if params.greedy:
        return int(np.argmax(logits))
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
    return int(order[rng.choice(len(order), p=probs)])


def sample(logits: np.ndarray, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """Next tokens for a batch ``[batch, vocab]``; greedy rows take one vectorized argmax."""
    tokens = np.argmax(logits, axis=-1).astype(np.int64)
    for row, (p, rng) in enumerate(zip(params, rngs)):
        if not p.greedy:
            tokens[row] = sample_row(logits[row], p, rng)
    return tokens
