"""The CONTINUOUS KV cache: one ``[slots, kv_heads, max_length, head_dim]`` buffer per layer and K/V.

Each running sequence owns a slot. The graph reads and writes a batch's slots through one contiguous
slice of every buffer, bound to onnxruntime by pointer as both the past and the present (the kernel
writes only the new tokens, in place). So a batch must occupy consecutive slots in row order: active
sequences are kept packed in slots ``0..n-1`` (releasing a slot moves the last sequence into the hole:
one sequence's tokens are copied, once), and :meth:`arrange` swaps slots when a batch is not already a
consecutive run.

Buffers come from the runtime backend (``runtime/backends/``: on the CPU, ``np.zeros``, whose pages the OS maps
lazily, so untouched capacity costs address space, not memory), as do their views and slot copies. Their element
type is ``params.dtype``, the type the artifact's graph declares for its
cache: float32, or int8 for an artifact compiled with ``kv_cache_bit_width=8`` (the attention kernel
quantizes what it writes and dequantizes what it reads; moving slots copies the int8 codes as they are,
since the scales are the same for every slot). So a token costs ``params.bytes_per_token`` (1 byte per
element in int8) and :attr:`bytes_per_slot` is what one sequence of ``max_seq_len`` tokens reserves.
"""
from __future__ import annotations

import logging

from typing import Any

import numpy as np

from ember.graphs.nn.kv_cache import KVCacheParams

from ..backends import RuntimeBackend
from .layer_buffers import LayerBuffers

logger = logging.getLogger(__name__)


class KVCacheExhausted(RuntimeError):
    """No free slot (or no room left in a slot) for a request; the caller queues or preempts it."""


class ContinuousKVCacheManager(LayerBuffers):
    """Slots of a contiguous KV cache (buffers from ``backend``), their lengths, and the views that bind them."""

    def __init__(self, params: KVCacheParams, max_batch_size: int, max_seq_len: int, *, backend: RuntimeBackend):
        self.params = params
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        super().__init__(params, (max_batch_size, params.n_kv_heads, max_seq_len, params.head_dim), backend)
        self._slot_of: dict[str, int] = {}
        self._owner: list[str | None] = [None] * max_batch_size
        self._length = np.zeros(max_batch_size, dtype=np.int64)
        self._views: dict[tuple[int, int], list[tuple[Any, Any]]] = {}

    # bookkeeping --------------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self._slot_of)

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - self.num_active

    @property
    def bytes_per_slot(self) -> int:
        """Bytes one slot (one sequence of up to ``max_seq_len`` tokens) takes over all layers, K and V."""
        return self.max_seq_len * self.params.bytes_per_token

    def contains(self, request_id: str) -> bool:
        return request_id in self._slot_of

    def slot(self, request_id: str) -> int:
        return self._slot_of[request_id]

    def cache_length(self, request_id: str) -> int:
        return int(self._length[self._slot_of[request_id]])

    def claim(self, request_id: str) -> int:
        """Give a new sequence the next free slot (slots stay packed from 0)."""
        if request_id in self._slot_of:
            raise ValueError(f"request {request_id} already holds slot {self._slot_of[request_id]}")
        if self.free_slots == 0:
            raise KVCacheExhausted(f"all {self.max_batch_size} KV cache slots are in use")
        slot = self.num_active
        self._slot_of[request_id] = slot
        self._owner[slot] = request_id
        self._length[slot] = 0
        return slot

    def step(self, request_id: str, new_tokens: int) -> None:
        """Record that ``new_tokens`` were written for the sequence."""
        slot = self._slot_of[request_id]
        if self._length[slot] + new_tokens > self.max_seq_len:
            raise KVCacheExhausted(f"request {request_id} would exceed the KV cache length {self.max_seq_len}")
        self._length[slot] += new_tokens

    def release(self, request_id: str) -> None:
        """Free the sequence's slot, moving the last active sequence into it to keep slots packed."""
        slot = self._slot_of.pop(request_id)
        last = len(self._slot_of)
        if slot != last:
            self._move(last, slot)
        self._owner[last] = None
        self._length[last] = 0

    def release_all(self) -> None:
        for request_id in list(self._slot_of):
            self.release(request_id)

    # batches ------------------------------------------------------------------------------------
    def arrange(self, request_ids: list[str]) -> tuple[int, list[str]]:
        """Make the batch occupy consecutive slots; returns ``(first_slot, ids in row order)``."""
        slots = sorted(self._slot_of[r] for r in request_ids)
        if slots and slots[-1] - slots[0] + 1 == len(slots):
            return slots[0], [self._holder(s) for s in slots]
        for row, request_id in enumerate(request_ids):
            current = self._slot_of[request_id]
            if current != row:
                self._swap(current, row)
        return 0, list(request_ids)

    def bindings(self, start: int, batch: int) -> list[tuple[Any, Any]]:
        """Per layer, (key, value) views over slots ``start .. start + batch - 1`` (made once, then cached)."""
        key = (start, batch)
        if key not in self._views:
            view = self.backend.view
            self._views[key] = [(view(k, start, start + batch), view(v, start, start + batch))
                                for k, v in zip(self.key_buffers, self.value_buffers)]
        return self._views[key]

    # data movement ------------------------------------------------------------------------------
    def _move(self, src: int, dst: int) -> None:
        n = int(self._length[src])
        self._copy([dst], [src], n)
        owner = self._holder(src)
        self._owner[dst], self._length[dst] = owner, n
        self._slot_of[owner] = dst

    def _swap(self, a: int, b: int) -> None:
        n = int(max(self._length[a], self._length[b]))
        self._copy([a, b], [b, a], n)
        self._owner[a], self._owner[b] = self._owner[b], self._owner[a]
        self._length[[a, b]] = self._length[[b, a]]
        for slot in (a, b):
            owner = self._owner[slot]
            if owner is not None:
                self._slot_of[owner] = slot

    def _holder(self, slot: int) -> str:
        """The request in an occupied slot."""
        owner = self._owner[slot]
        if owner is None:
            raise RuntimeError(f"slot {slot} is free")
        return owner

    def _copy(self, dst: list[int], src: list[int], length: int) -> None:
        """Slots ``src`` into slots ``dst``, their first ``length`` positions, in every layer's K and V."""
        for buffer in self.all_buffers:
            self.backend.copy_rows(buffer, dst, src, (slice(None), slice(0, length)))
