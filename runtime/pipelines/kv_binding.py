"""How a decoder's KV cache is claimed, grouped into model calls and bound, per KV cache strategy.

The decoder pipeline model is the same for both strategies; what differs is here:

* CONTINUOUS (:class:`ContinuousBinding`): a request holds one slot of ``max_seq_len`` tokens from
  admission on, so admission is bounded by the slot count and reserving is only a length check. A call's
  rows must occupy consecutive slots (the manager arranges them), and onnxruntime's GroupQueryAttention
  runs only some mixes of rows in one call (:func:`batch_mode`), so a scheduled step may take several calls.
* PAGED (:class:`PagedBinding`): pages are taken as tokens arrive (admission can be served in part from
  the prefix cache), any mix of prompt, decode and prompt-continuation rows runs in one call, and the
  graph reads pages through a page table and writes new K/V at a slot mapping into pools bound in place.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..kv_cache.continuous import ContinuousKVCacheManager, KVCacheExhausted
from ..kv_cache.paged import PagedKVCacheManager
from ..session import LoadedModel
from .context import TextContext


@dataclass(frozen=True)
class ContinuousKVInputs:
    """What a CONTINUOUS call binds besides its tokens: the first of the consecutive slots its rows occupy."""

    kv_start: int


@dataclass(frozen=True)
class PagedKVInputs:
    """What a PAGED call binds besides its tokens: ``page_table`` int32 [batch, pages] and ``slot_mapping``
    int64 [batch, seq] (where each new token's K/V goes in the pools)."""

    page_table: np.ndarray
    slot_mapping: np.ndarray


#: What a call binds besides its tokens, whichever the strategy (the decoder passes it through untouched).
KVInputs = ContinuousKVInputs | PagedKVInputs | None


def batch_mode(input_lengths: np.ndarray, cache_lengths: np.ndarray) -> str | None:
    """``prefill``, ``decode`` or ``extend`` (one row after a prefix); None if GroupQueryAttention cannot run it."""
    if int(input_lengths.max()) == 1:
        return "decode"
    if not cache_lengths.any():
        return "prefill"
    if len(input_lengths) == 1:
        return "extend"
    return None


class ContinuousBinding:
    """KV slots of a CONTINUOUS cache (see the module docstring)."""

    def __init__(self, manager: ContinuousKVCacheManager):
        self.manager = manager
        # (model, views) bound last: a decode step binds the same slot views as the one before (batch 1:
        # always), and checking one pair instead of 4 buffers per layer saves ~0.2 ms of a ~7 ms step.
        self._bound: tuple[LoadedModel, list] | None = None  # held, so neither can be freed and its id reused

    @property
    def max_batch_size(self) -> int:
        return self.manager.max_batch_size

    def admit(self, context: TextContext) -> bool:
        if self.manager.free_slots == 0:
            return False
        self.manager.claim(context.request_id)
        context.start_idx = 0
        return True

    def ensure_claimed(self, context: TextContext) -> None:
        """For callers that skip admission (``next_token``): a slot now, or KVCacheExhausted."""
        if not self.manager.contains(context.request_id):
            if context.start_idx != 0:
                raise ValueError(f"request {context.request_id} has cached tokens but no KV cache slot")
            self.manager.claim(context.request_id)

    def reserve(self, context: TextContext, num_tokens: int) -> bool:
        return self.manager.cache_length(context.request_id) + num_tokens <= self.manager.max_seq_len

    def groups(self, rows: Sequence[tuple[TextContext, int]]) -> list[list[int]]:
        """Row indices per model call: decode rows together, fresh prompts together, each continuation alone."""
        decode = [i for i, (_, n) in enumerate(rows) if n == 1]
        fresh = [i for i, (ctx, n) in enumerate(rows) if n > 1 and ctx.start_idx == 0]
        extend = [[i] for i, (ctx, n) in enumerate(rows) if n > 1 and ctx.start_idx > 0]
        return [g for g in (decode, fresh) if g] + extend

    def order(self, request_ids: list[str]) -> tuple[list[str], ContinuousKVInputs]:
        """Row order for a call (consecutive slots), and what :meth:`bind` needs of it."""
        start, order = self.manager.arrange(request_ids)
        return order, ContinuousKVInputs(start)

    def check(self, input_lengths: np.ndarray, cache_lengths: np.ndarray) -> None:
        if batch_mode(input_lengths, cache_lengths) is None:
            raise ValueError("a batch must be all new prompts, one token per row, or a single row; split it")

    def step_inputs(self, request_ids: list[str], counts: np.ndarray, seq_len: int,
                    prev: KVInputs) -> ContinuousKVInputs:
        if not isinstance(prev, ContinuousKVInputs):
            raise TypeError(f"a continuous cache's call needs its rows' first slot (from order()), not {prev!r}")
        return prev  # the rows keep their slots

    def bind(self, model: LoadedModel, request_ids: list[str], kv: ContinuousKVInputs) -> None:
        params = self.manager.params
        views = self.manager.bindings(kv.kv_start, len(request_ids))
        if self._bound is not None and self._bound[0] is model and self._bound[1] is views:
            return
        self._bound = (model, views)
        for layer, (key, value) in enumerate(views):
            past_key, past_value = params.input_names(layer)
            present_key, present_value = params.output_names(layer)
            model.bind_buffer(past_key, key)
            model.bind_buffer(past_value, value)
            model.bind_buffer(present_key, key, output=True)
            model.bind_buffer(present_value, value, output=True)

    def commit(self, request_ids: list[str], tokens: np.ndarray, counts: np.ndarray) -> None:
        for request_id, n in zip(request_ids, counts):
            self.manager.step(request_id, int(n))

    def release(self, request_id: str) -> None:
        if self.manager.contains(request_id):
            self.manager.release(request_id)


class PagedBinding:
    """Pages of a PAGED cache (see the module docstring)."""

    def __init__(self, manager: PagedKVCacheManager, max_batch_size: int, page_major: bool = False):
        self.manager = manager
        self.max_batch_size = max_batch_size
        self.page_major = page_major  # the graph's pools are [pages, page_size, kv, head_dim] (contrib kernel)
        self._bound: tuple[LoadedModel, list] | None = None

    def admit(self, context: TextContext) -> bool:
        """Claim the request's cached prefix (its ``start_idx`` moves past it) if its first page fits."""
        if self.manager.num_active >= self.max_batch_size or not self.manager.can_admit(context.tokens, 1):
            return False
        context.start_idx = self._claim(context)
        return True

    def _claim(self, context: TextContext) -> int:
        # A request that wants its prompt's log probabilities computes every prompt position: no shared prefix.
        return self.manager.claim(context.request_id, context.tokens,
                                  reuse_prefix=context.sampling.prompt_logprobs is None)

    def ensure_claimed(self, context: TextContext) -> None:
        if not self.manager.contains(context.request_id):
            if context.start_idx != 0:
                raise ValueError(f"request {context.request_id} has cached tokens but no KV cache pages")
            if self.manager.num_active >= self.max_batch_size:
                raise KVCacheExhausted(f"{self.max_batch_size} requests are already running")
            context.start_idx = self._claim(context)
        self.manager.reserve(context.request_id, context.active_idx - context.start_idx)

    def reserve(self, context: TextContext, num_tokens: int) -> bool:
        if not self.manager.can_reserve(context.request_id, num_tokens):
            return False
        self.manager.reserve(context.request_id, num_tokens)
        return True

    def groups(self, rows: Sequence[tuple[TextContext, int]]) -> list[list[int]]:
        return [list(range(len(rows)))]

    def order(self, request_ids: list[str]) -> tuple[list[str], None]:
        return list(request_ids), None  # any rows, any order: the page table says where each row's K/V is

    def check(self, input_lengths: np.ndarray, cache_lengths: np.ndarray) -> None:
        pass  # the paged graph runs any mix of rows

    def step_inputs(self, request_ids: list[str], counts: np.ndarray, seq_len: int,
                    prev: KVInputs) -> PagedKVInputs:
        for request_id, n in zip(request_ids, counts):
            self.manager.reserve(request_id, int(n))
        return PagedKVInputs(*self.manager.batch_inputs(request_ids, counts, seq_len))

    def bind(self, model: LoadedModel, request_ids: list[str], kv: PagedKVInputs) -> None:
        model.bind_input("page_table", kv.page_table)
        model.bind_input("slot_mapping", kv.slot_mapping)
        pools = self.manager.bindings(self.page_major)
        if self._bound is not None and self._bound[0] is model and self._bound[1] is pools:
            return  # the pools are bound once per model (see ContinuousBinding.bind)
        self._bound = (model, pools)
        for layer, (key, value) in enumerate(pools):
            model.bind_buffer(f"key_cache.{layer}", key)
            model.bind_buffer(f"value_cache.{layer}", value)
            model.bind_buffer(f"key_cache_out.{layer}", key, output=True)
            model.bind_buffer(f"value_cache_out.{layer}", value, output=True)

    def commit(self, request_ids: list[str], tokens: np.ndarray, counts: np.ndarray) -> None:
        for row, (request_id, n) in enumerate(zip(request_ids, counts)):
            self.manager.commit(request_id, tokens[row, :int(n)].tolist())

    def release(self, request_id: str) -> None:
        if self.manager.contains(request_id):
            self.manager.release(request_id)
