"""Which draft tokens to keep: the target model's distribution is preserved exactly.

A verification row computes the pending token and ``d`` draft tokens in one call, giving the target's logits at
``d + 1`` positions. Position ``j`` is decided with the context's sampling rules as they stand after the tokens
kept before it (penalties see them), and the row stops at the first rejection.

Drafts that are a point mass (prompt-lookup drafts, a greedy draft model) need no separate rule: drawing
``y ~ p`` with the normal sampler and keeping the draft ``x`` when ``y == x`` accepts ``x`` with probability
``p(x)`` and otherwise yields ``p`` without ``x``, renormalised, which is the standard rejection rule for
``q = δ_x``. Every emitted token is then one draw of the request's seeded generator from the same processed
distribution as plain decoding, so the output is *identical* to plain decoding (greedy and seeded sampling
alike). A draft model that samples from its own ``q`` uses :func:`rejection_sample`: accept with
``min(1, p(x) / q(x))``, else draw from ``(p - q)+`` renormalised (Leviathan et al. 2023; Chen et al. 2023).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..pipelines.context import TextContext
from ..pipelines.sampling import apply_penalties, candidate_distribution, sample_contexts


def verify_and_append(context: TextContext, logits: np.ndarray, drafts: Sequence[int],
                      draft_probabilities: Sequence[np.ndarray] | None = None) -> tuple[list[int], int]:
    """Decide a verification row and append the tokens it yields to ``context``; returns ``(tokens, accepted)``.

    ``logits``: ``[len(drafts) + 1, vocab]``, row ``j`` predicting the token after the pending token and the
    first ``j`` drafts. ``draft_probabilities``: per draft, the draft model's full distribution ``q`` it was
    sampled from (None: point-mass drafts). Stops early when the context finishes (EOS, stop token,
    ``max_new_tokens`` or the length limit inside an accepted run): no token past the finish is kept.
    """
    tokens: list[int] = []
    accepted = 0
    for j in range(len(drafts) + 1):
        if j < len(drafts) and draft_probabilities is not None and not context.sampling.greedy:
            token, ok = rejection_sample(target_distribution(logits[j], context), draft_probabilities[j],
                                         int(drafts[j]), context.rng)
        else:
            token = int(sample_contexts(logits[j:j + 1], [context])[0])
            ok = j < len(drafts) and token == int(drafts[j])
        context.append(token)
        tokens.append(token)
        accepted += ok
        if not ok or context.is_done:
            break
    return tokens, accepted


def target_distribution(logits: np.ndarray, context: TextContext) -> np.ndarray:
    """The full ``[vocab]`` distribution the context's sampler draws its next token from (penalties, temperature,
    top-k, top-p): what draft tokens are accepted against."""
    params = context.sampling
    if context.token_counts is not None and params.penalized:
        logits = apply_penalties(logits, params, context.token_counts)
    p = np.zeros(logits.shape[-1], np.float64)
    if params.greedy:
        p[int(np.argmax(logits))] = 1.0
        return p
    order, probs = candidate_distribution(logits, params)
    p[order] = probs
    return p


def rejection_sample(p: np.ndarray, q: np.ndarray, draft: int, rng: np.random.Generator) -> tuple[int, bool]:
    """The standard speculative rule for a draft ``x ~ q``: keep it with probability ``min(1, p(x) / q(x))``,
    else draw from ``max(p - q, 0)`` renormalised. The result is distributed exactly as ``p``. Returns
    ``(token, accepted)``."""
    px, qx = float(p[draft]), float(q[draft])
    if qx <= 0:
        raise ValueError(f"draft token {draft} has probability 0 under the draft distribution it came from")
    if rng.random() < min(1.0, px / qx):
        return draft, True
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    if total <= 0:  # p == q up to rounding: the acceptance above had probability 1
        residual, total = p, p.sum()
    return int(rng.choice(len(residual), p=residual / total)), False
