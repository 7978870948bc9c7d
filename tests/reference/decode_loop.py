"""Greedy (or forced) decoding step by step through a pipeline model, keeping the logits of every step."""
from __future__ import annotations

import numpy as np


def decode_steps(pipeline, ids: list[int], steps: int,
                 forced: list[int] | None = None) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    """``steps`` tokens after ``ids``: greedy, or ``forced`` ones. Returns the tokens, the next-token logits
    that preceded each ``[steps, vocab]``, and (when the pipeline returns logits at all positions) every
    position's logits ``[len(ids) + steps - 1, vocab]``."""
    model = pipeline.pipeline_model
    ctx = pipeline.new_context(ids)
    inputs = model.prepare_initial_token_inputs([ctx])
    out = model.execute(inputs)
    positions = [out.logits[0, :len(ids)]] if out.logits is not None else None
    tokens, step_logits = [], []
    for step in range(steps):
        step_logits.append(out.next_token_logits[0])
        token = int(np.argmax(step_logits[-1])) if forced is None else forced[step]
        tokens.append(token)
        ctx.start_idx = ctx.active_idx
        ctx.append(token)
        if step < steps - 1:
            inputs = model.prepare_next_token_inputs(np.array([token]), inputs)
            out = model.execute(inputs)
            if positions is not None:
                positions.append(out.next_token_logits)
    model.release(ctx.request_id)
    return tokens, np.stack(step_logits), None if positions is None else np.concatenate(positions, axis=0)


def greedy_steps(pipeline, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """``steps`` greedy tokens and every position's logits (the pipeline must return them all)."""
    tokens, _, positions = decode_steps(pipeline, ids, steps)
    return tokens, positions
