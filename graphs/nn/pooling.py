"""Sentence-embedding pooling over the valid tokens, and L2 normalization, inside the graph.

Pooling in the graph lets an embeddings artifact return ``[batch, hidden]`` instead of the whole
``[batch, sequence, hidden]`` state, and keeps the padding rules in one place. Each mode matches
sentence-transformers' ``Pooling`` on right- (or left-) padded rows:

- ``mean``: ``sum(h * m) / max(sum(m), 1e-9)`` over the sequence;
- ``cls``: the first token;
- ``max``: the maximum over valid tokens (padding replaced by ``-1e9`` first, as sentence-transformers);
- ``lasttoken``: the last valid token of each row (``ArgMax`` of the mask taking the last maximum, so
  the padding side does not matter).

:func:`l2_normalize` is sentence-transformers' ``Normalize``: ``x / max(||x||, 1e-12)``.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..ir import ops
from ..ir.graph import current_graph

POOLING_MODES = ("mean", "cls", "max", "lasttoken")
FLOAT = ir.DataType.FLOAT


def _scalar(value: float) -> ir.Value:
    return ops.constant(np.array(value, dtype=np.float32))


def pool(h: ir.Value, attention_mask: ir.Value, mode: str, scope: str = "pooling") -> ir.Value:
    """``h`` ``[batch, sequence, hidden]``, ``attention_mask`` int ``[batch, sequence]`` -> ``[batch, hidden]``."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling {mode!r} is not supported; supported: {', '.join(POOLING_MODES)}")
    with current_graph().scope(f"{scope}.{mode}"):
        if mode == "cls":
            return ops.gather(h, ops.constant(np.array(0, dtype=np.int64)), axis=1)
        if mode == "lasttoken":
            last = ops.arg_max(ops.cast(attention_mask, ir.DataType.INT32), axis=1, keepdims=True,
                               select_last_index=True)  # [batch, 1]
            return ops.gather_nd(h, last, batch_dims=1)
        if mode == "max":
            is_padding = ops.unsqueeze(ops.equal(attention_mask, ops.constant(np.array(0, dtype=np.int64))), [2])
            return ops.reduce_max(ops.where(is_padding, _scalar(-1e9), h), axes=[1])
        mask = ops.unsqueeze(ops.cast(attention_mask, FLOAT), [2])  # [batch, sequence, 1]
        total = ops.reduce_sum(ops.mul(h, mask), axes=[1])
        count = ops.maximum(ops.reduce_sum(mask, axes=[1]), _scalar(1e-9))  # [batch, 1]
        return ops.div(total, count)


def l2_normalize(x: ir.Value, eps: float = 1e-12, scope: str = "normalize") -> ir.Value:
    """``x / max(||x||_2, eps)`` over the last axis."""
    with current_graph().scope(scope):
        norm = ops.maximum(ops.reduce_l2(x, axes=[-1], keepdims=True), _scalar(eps))
        return ops.div(x, norm)
