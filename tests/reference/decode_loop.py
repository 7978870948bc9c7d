"""Greedy decoding step by step through a pipeline model, keeping the logits of every position."""
from __future__ import annotations

import numpy as np


def greedy_steps(pipeline, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """``steps`` greedy tokens after ``ids`` and the logits that chose them: ``[len(ids) + steps - 1, vocab]``
    (the prompt's positions, then one row per decode step; the pipeline must return logits at all positions)."""
    model = pipeline.pipeline_model
    ctx = pipeline.new_context(ids)
    inputs = model.prepare_initial_token_inputs([ctx])
    out = model.execute(inputs)
    tokens, logits = [], [out.logits[0, :len(ids)]]
    for step in range(steps):
        token = int(np.argmax(out.next_token_logits[0]))
        tokens.append(token)
        ctx.start_idx = ctx.active_idx
        ctx.append(token)
        if step < steps - 1:
            inputs = model.prepare_next_token_inputs(np.array([token]), inputs)
            out = model.execute(inputs)
            logits.append(out.next_token_logits)
    model.release(ctx.request_id)
    return tokens, np.concatenate(logits, axis=0)
