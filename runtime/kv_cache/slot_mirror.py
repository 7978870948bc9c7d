"""Decode slots: contiguous KV slots that mirror some sequences of a paged cache, so that their steps can run the
continuous graph.

Why: on onnxruntime's CPU provider a paged decode step reads each row's pages through ~20 standard ops per layer,
where the continuous graph's GroupQueryAttention reads and writes a slot in place in one node; at low concurrency
that costs a 4-bit decode step about a fifth of its time (BENCHMARKS.md "Where the batch-1 gap goes"). A sequence
given a slot here keeps its pages (prefix caching, preemption and mixed steps work as before) and runs in the slot
while a step holds no more rows than there are slots (at concurrency 1: its prompt and every decode step).

The pages stay the truth; a slot is a copy that runs ahead or behind. Per mirrored request two lengths: the
slot's (tokens whose K/V the slot holds: the slot manager's length) and the pool's (tokens whose K/V its pages
hold). One of them always equals the request's committed length:

- before a step in the slots, :meth:`prepare` copies what the pool has and the slot lacks (tokens a paged step
  computed) into the slot; the slot step then writes the new token in the slot only;
- before anything reads the pool (a paged step, any request's slot being filled), :meth:`flush` copies what the
  slots have and the pool lacks into the pages, so full pages registered in the prefix cache hold their K/V by
  the time another request can read them;
- :meth:`release` flushes the request before its pages are released (cached pages keep their content).

Copies are host numpy copies of the tokens that moved, per layer (usually the few decoded since the last write-back),
so both managers' buffers must be host arrays (the CPU backend's).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .continuous import ContinuousKVCacheManager
from .paged import PagedKVCacheManager


class SlotMirror:
    """The decode slots of one paged cache (see the module docstring)."""

    def __init__(self, pages: PagedKVCacheManager, slots: ContinuousKVCacheManager):
        if (pages.params.n_kv_heads, pages.params.head_dim, pages.params.num_layers) != (
                slots.params.n_kv_heads, slots.params.head_dim, slots.params.num_layers):
            raise ValueError("decode slots must have the paged cache's layers, KV heads and head size")
        if np.dtype(pages.params.dtype) != np.dtype(slots.params.dtype):
            raise ValueError(f"decode slots of {slots.params.dtype} cannot mirror pages of {pages.params.dtype}")
        if slots.max_seq_len < pages.max_seq_len:
            raise ValueError(f"decode slots of {slots.max_seq_len} tokens cannot hold sequences of "
                             f"{pages.max_seq_len}")
        self.pages, self.slots = pages, slots
        if pages.backend.device_kind != "cpu" or slots.backend.device_kind != "cpu":
            raise ValueError("decode slots need the KV buffers in host memory (a CPU backend)")
        # The buffers themselves on the CPU backend; the same order in both: every layer's K, then every layer's V.
        self._pool_arrays = [pages.backend.to_host(b) for b in pages.all_buffers]
        self._slot_arrays = [slots.backend.to_host(b) for b in slots.all_buffers]
        self._pool_length: dict[str, int] = {}  # per mirrored request: tokens whose K/V its pages hold

    def can_take(self, request_ids: Sequence[str]) -> bool:
        """Whether every row holds a slot or can get a free one now."""
        new = sum(1 for r in request_ids if r not in self._pool_length)
        return new <= self.slots.free_slots

    def prepare(self, request_ids: Sequence[str]) -> None:
        """Slots for the rows (claimed if new), each holding its request's committed tokens."""
        for request_id in request_ids:
            if request_id not in self._pool_length:
                self.flush()  # the new slot is filled from pages that may hold another slot's tokens
                self.slots.claim(request_id)
                self._pool_length[request_id] = self.pages.cache_length(request_id)
            committed = self.pages.cache_length(request_id)
            in_slot = self.slots.cache_length(request_id)
            if in_slot < committed:
                if self._pool_length[request_id] != committed:
                    raise AssertionError(f"request {request_id}: neither its slot nor its pages hold all its tokens")
                self._copy(request_id, in_slot, committed, to_slot=True)
                self.slots.step(request_id, committed - in_slot)

    def flush(self) -> None:
        """Write every slot's tokens that its pages lack into the pages."""
        for request_id, in_pool in self._pool_length.items():
            committed = self.pages.cache_length(request_id)
            if in_pool < committed:
                self._copy(request_id, in_pool, committed, to_slot=False)
                self._pool_length[request_id] = committed

    def paged_step_done(self, request_ids: Sequence[str]) -> None:
        """A paged step wrote the rows' new tokens into their pages (after :meth:`flush`): the pages are complete."""
        for request_id in request_ids:
            if request_id in self._pool_length:
                self._pool_length[request_id] = self.pages.cache_length(request_id)

    def release(self, request_id: str) -> None:
        """Flush the request into its pages and free its slot (before the pages themselves are released)."""
        if request_id in self._pool_length:
            self.flush()
            del self._pool_length[request_id]
            self.slots.release(request_id)

    def _rows(self, request_id: str, start: int, stop: int) -> np.ndarray:
        """Pool rows of the request's positions ``start .. stop - 1``."""
        ps = self.pages.page_size
        positions = np.arange(start, stop)
        return np.asarray(self.pages.page_table(request_id), np.int64)[positions // ps] * ps + positions % ps

    def _copy(self, request_id: str, start: int, stop: int, *, to_slot: bool) -> None:
        """Tokens ``start .. stop - 1`` of a request between its pages and its slot, in every layer's K and V."""
        rows = self._rows(request_id, start, stop)
        slot = self.slots.slot(request_id)
        for pool, slots in zip(self._pool_arrays, self._slot_arrays):
            if to_slot:
                slots[slot, :, start:stop] = pool[rows].transpose(1, 0, 2)
            else:
                pool[rows] = slots[slot, :, start:stop].transpose(1, 0, 2)

    def check_invariants(self) -> None:
        """Raise AssertionError unless each mirrored request's slot or pages hold all its committed tokens and the
        two agree where both hold them (O(tokens); for tests)."""
        for request_id, in_pool in self._pool_length.items():
            committed = self.pages.cache_length(request_id)
            in_slot = self.slots.cache_length(request_id)
            if max(in_pool, in_slot) != committed:
                raise AssertionError(f"request {request_id}: pages hold {in_pool}, slot {in_slot}, committed "
                                     f"{committed}")
            both = min(in_pool, in_slot)
            rows = self._rows(request_id, 0, both)
            slot = self.slots.slot(request_id)
            for pool, slots in zip(self._pool_arrays, self._slot_arrays):
                if not np.array_equal(pool[rows], slots[slot, :, :both].transpose(1, 0, 2)):
                    raise AssertionError(f"request {request_id}: its slot and its pages differ")
