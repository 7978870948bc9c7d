"""What one call of a decoder takes: its rows' tokens and lengths, and what its KV strategy binds.

Its own module so that the decoder and its decode slots (:mod:`.decode_slots`) share it without importing each other.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .interfaces import ModelInputs


@dataclasses.dataclass(kw_only=True)
class DecoderInputs(ModelInputs):
    """``tokens`` [batch, seq] int64 (right-padded), ``input_lengths`` and ``cache_lengths`` [batch] int32."""

    tokens: np.ndarray
    input_lengths: np.ndarray
    cache_lengths: np.ndarray
    request_ids: list[str] = dataclasses.field(default_factory=list)
    return_n_logits: int = 1
    # ``kv_cache_inputs`` (ModelInputs' field): what the KV strategy binds besides the cache,
    # ``ContinuousKVInputs`` (the rows' first slot) or ``PagedKVInputs`` (page table, slot mapping); kv_binding.py.
