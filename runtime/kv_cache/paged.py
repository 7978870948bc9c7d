"""The PAGED KV cache: a pool of fixed-size pages per layer and K/V, a page table per request.

Memory: per layer, one K and one V buffer of ``[num_pages * page_size, n_kv_heads, head_dim]`` rows of
``params.dtype``; token row ``page * page_size + offset`` holds the token at ``offset`` in that page. The
buffers come from the runtime backend (on the CPU ``np.zeros``, which the OS maps lazily: untouched pages cost
address space, not memory) and are bound once, by address, as both the graph's cache input and its output: the graph writes the
step's new K/V with ``ScatterND`` at the rows of the *slot mapping* and gathers each request's pages through
its *page table*, so a step costs O(new tokens) of writes, never a copy of the cache.

A request's lifecycle, as the pipeline and scheduler drive it::

    cached = kv.claim(rid, prompt)             # reuse cached prefix pages; returns tokens served from cache
    kv.reserve(rid, len(prompt) - cached)      # pages for the rest (KVCacheExhausted: all-or-nothing)
    table, slots = kv.batch_inputs([rid], [len(prompt) - cached], seq_len)
    ...run the graph...                        # it writes K/V of prompt[cached:] at `slots`
    kv.commit(rid, prompt[cached:])            # now cached; full pages become reusable by other requests
    kv.reserve(rid, 1); ...; kv.commit(rid, [token])   # each decode step: the token fed to the graph
    kv.release(rid)                            # or kv.preempt(rid) -> tokens, to recompute later

Prefix caching: committed full pages are registered in the :class:`PagePool` under a hash chained over the
sequence's pages (see :mod:`.block_pool`), so a new request whose prompt starts with the same whole pages
takes references to those pages instead of recomputing them. Shared pages are only ever full, so they are
never written again; a request's partially filled last page is always its own (:meth:`fork` copies it).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from typing import Any

import numpy as np

from ember.graphs.nn.kv_cache import KVCacheParams, KVCacheStrategy

from ..backends import RuntimeBackend
from .layer_buffers import LayerBuffers
from .block_pool import SCRATCH_PAGE, CachedPage, PagePool, page_hash
from .continuous import KVCacheExhausted

logger = logging.getLogger(__name__)


class _Request:
    """One request's view of the cache: its pages, its committed tokens, and its prefix-hash chain."""

    __slots__ = ("row", "pages", "tokens", "prompt", "num_hashed", "chain", "chain_ok")

    def __init__(self, row: int, prompt: list[int]):
        self.row = row  # its row in the manager's page-table array
        self.pages: list[int] = []  # page table: pages[i] holds tokens i*page_size .. (i+1)*page_size-1
        self.tokens: list[int] = []  # tokens whose K/V are in the cache, in order
        self.prompt = prompt
        self.num_hashed = 0  # leading full pages already registered (or deliberately skipped)
        self.chain: CachedPage | None = None  # the entry standing for pages[:num_hashed]
        self.chain_ok = True  # False after a hash collision or with prefix caching off


class PagedKVCacheManager(LayerBuffers):
    """Pages of a paged KV cache, the requests holding them, and the views that bind them.

    Counters for metrics and tests: ``prompt_tokens_requested`` (prompt tokens over all :meth:`claim`
    calls), ``prompt_tokens_cached`` (those served from the prefix cache), ``preemptions``; the pool's
    ``allocations``, ``evictions``, ``cache_queries``, ``cache_hits`` are on :attr:`pool` and in
    :meth:`stats`.
    """

    def __init__(self, params: KVCacheParams, num_pages: int, page_size: int, max_seq_len: int,
                 enable_prefix_caching: bool = True, *, backend: RuntimeBackend):
        if params.cache_strategy == KVCacheStrategy.PAGED and page_size != params.page_size:
            raise ValueError(f"page_size {page_size} differs from the graph's KV cache page_size "
                             f"{params.page_size}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.params = params
        self.page_size = page_size
        self.max_seq_len = max_seq_len
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = PagePool(num_pages, page_size)
        self.max_pages_per_seq = -(-max_seq_len // page_size)
        shape = (num_pages * page_size, params.n_kv_heads, params.head_dim)
        super().__init__(params, shape, backend)
        self._requests: dict[str, _Request] = {}
        # Page tables of live requests as one array, a row per request, so that batch_inputs gathers a
        # batch's page table with one numpy call; zero (the scratch page) past each request's pages.
        rows = 8
        self._table = np.zeros((rows, self.max_pages_per_seq), np.int32)
        self._free_rows = list(range(rows - 1, -1, -1))
        self._positions = np.arange(max(max_seq_len, self.max_pages_per_seq), dtype=np.int64)
        self._bindings: list[tuple[Any, Any]] | None = None
        self._bindings_page_major = False
        self.prompt_tokens_requested = 0
        self.prompt_tokens_cached = 0
        self.preemptions = 0
        logger.debug("paged KV cache: %d pages of %d tokens (%d bytes each), max_seq_len %d, prefix caching %s",
                     num_pages, page_size, self.bytes_per_page, max_seq_len, enable_prefix_caching)

    # sizing -------------------------------------------------------------------------------------------
    @staticmethod
    def page_bytes(params: KVCacheParams, page_size: int) -> int:
        """Bytes one page takes over all layers, K and V."""
        return page_size * params.bytes_per_token

    @classmethod
    def required_bytes(cls, params: KVCacheParams, page_size: int, max_seq_len: int,
                       num_sequences: int = 1) -> int:
        """Bytes for ``num_sequences`` sequences of ``max_seq_len`` tokens, plus the scratch page."""
        pages = 1 + num_sequences * -(-max_seq_len // page_size)
        return pages * cls.page_bytes(params, page_size)

    @classmethod
    def from_memory(cls, params: KVCacheParams, num_bytes: int, page_size: int, max_seq_len: int,
                    enable_prefix_caching: bool = True, *, backend: RuntimeBackend) -> PagedKVCacheManager:
        """As many pages as fit in ``num_bytes`` (e.g. ``--kv-cache-bytes``), scratch page included.

        Raises ValueError when the budget cannot hold one sequence of ``max_seq_len`` tokens: such a
        server could accept a request it can never finish.
        """
        num_pages = int(num_bytes) // cls.page_bytes(params, page_size)
        needed = cls.required_bytes(params, page_size, max_seq_len)
        if num_bytes < needed:
            raise ValueError(f"a KV cache of {num_bytes} bytes holds {num_pages} pages of {page_size} tokens; "
                             f"one sequence of {max_seq_len} tokens needs {needed} bytes")
        return cls(params, num_pages, page_size, max_seq_len, enable_prefix_caching, backend=backend)

    @property
    def bytes_per_page(self) -> int:
        return self.page_bytes(self.params, self.page_size)

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    # bookkeeping --------------------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self._requests)

    @property
    def free_pages(self) -> int:
        """Pages a reservation can obtain now (free plus evictable cached pages)."""
        return self.pool.num_available

    def contains(self, request_id: str) -> bool:
        return request_id in self._requests

    def cache_length(self, request_id: str) -> int:
        """Tokens of the request whose K/V are in the cache (committed, or served from the prefix cache)."""
        return len(self._requests[request_id].tokens)

    def capacity(self, request_id: str) -> int:
        """Tokens the request's pages can hold (committed plus reserved)."""
        return len(self._requests[request_id].pages) * self.page_size

    def tokens(self, request_id: str) -> list[int]:
        """A copy of the request's committed tokens."""
        return list(self._requests[request_id].tokens)

    def page_table(self, request_id: str) -> list[int]:
        """A copy of the request's page table (reserved pages included)."""
        return list(self._requests[request_id].pages)

    def cache_lengths(self, request_ids: Sequence[str]) -> np.ndarray:
        """int64 ``[batch]``: each request's cache length (its K/V already written before this step)."""
        requests = self._requests
        return np.fromiter((len(requests[r].tokens) for r in request_ids), np.int64, count=len(request_ids))

    def stats(self) -> dict[str, int]:
        return {**self.pool.stats(), "active": self.num_active,
                "prompt_tokens_requested": self.prompt_tokens_requested,
                "prompt_tokens_cached": self.prompt_tokens_cached, "preemptions": self.preemptions}

    # prefix cache -------------------------------------------------------------------------------------
    def _max_cached_pages(self, prompt_len: int) -> int:
        # The model must run on at least the last prompt token: its logits give the first generated token.
        # So at most len - 1 tokens come from the cache, rounded down to whole pages (a page is shared only
        # when full, which also keeps shared pages read-only).
        return max(prompt_len - 1, 0) // self.page_size

    def _walk(self, prompt: Sequence[int], take: bool) -> list[CachedPage]:
        """The longest run of cached pages that prefixes ``prompt`` (references taken when ``take``)."""
        hits: list[CachedPage] = []
        if not self.enable_prefix_caching:
            return hits
        parent: CachedPage | None = None
        ps = self.page_size
        for i in range(self._max_cached_pages(len(prompt))):
            tokens = tuple(prompt[i * ps:(i + 1) * ps])
            h = page_hash(None if parent is None else parent.hash, tokens)
            entry = self.pool.lookup(h, tokens, parent) if take else self.pool.peek(h, tokens, parent)
            if entry is None:
                break
            hits.append(entry)
            parent = entry
        return hits

    def match_prefix(self, prompt_tokens: Sequence[int]) -> int:
        """Tokens :meth:`claim` would serve from the cache now; changes nothing (no references, counters)."""
        return len(self._walk(prompt_tokens, take=False)) * self.page_size

    def pages_to_admit(self, prompt_tokens: Sequence[int], extra_tokens: int = 0) -> int:
        """Available pages that claiming this prompt and reserving it (plus ``extra_tokens``) would use.

        Counts the new pages and the cached hits that are now evictable (taking them removes them from
        what is available); compare with :attr:`free_pages`.
        """
        hits = self._walk(prompt_tokens, take=False)
        total = -(-(len(prompt_tokens) + extra_tokens) // self.page_size)
        revived = sum(1 for e in hits if self.pool.refcount(e.page) == 0)
        return total - len(hits) + revived

    def can_admit(self, prompt_tokens: Sequence[int], extra_tokens: int = 0) -> bool:
        """Whether ``claim`` then ``reserve(len(prompt) - cached + extra_tokens)`` would succeed now."""
        if len(prompt_tokens) + extra_tokens > self.max_seq_len:
            return False
        return self.pages_to_admit(prompt_tokens, extra_tokens) <= self.pool.num_available

    # requests -----------------------------------------------------------------------------------------
    def claim(self, request_id: str, prompt_tokens: Sequence[int], reuse_prefix: bool = True) -> int:
        """Start a request; returns how many leading prompt tokens are already in the cache.

        ``reuse_prefix=False`` shares nothing and publishes nothing (a request that needs every prompt
        position computed, e.g. for the prompt's log probabilities).

        With prefix caching, the longest run of cached full pages that prefixes the prompt is shared
        (references taken), never covering the last prompt token (see :meth:`_max_cached_pages`). The
        caller computes ``prompt_tokens[cached:]`` after :meth:`reserve`-ing room for them. Claiming
        allocates nothing, so it never raises :class:`KVCacheExhausted`.
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id} already holds KV cache pages")
        prompt = list(prompt_tokens)
        if len(prompt) > self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds max_seq_len {self.max_seq_len}")
        hits = self._walk(prompt, take=True) if reuse_prefix else []
        request = _Request(self._take_row(), prompt)
        request.pages = [e.page for e in hits]
        cached = len(hits) * self.page_size
        request.tokens = prompt[:cached]
        request.num_hashed = len(hits)
        request.chain = hits[-1] if hits else None
        request.chain_ok = self.enable_prefix_caching and reuse_prefix
        self._requests[request_id] = request
        self._sync_row(request)
        self.prompt_tokens_requested += len(prompt)
        self.prompt_tokens_cached += cached
        return cached

    def pages_needed(self, request_id: str, new_tokens: int) -> int:
        """New pages :meth:`reserve` would allocate for ``new_tokens`` more tokens."""
        request = self._requests[request_id]
        total = len(request.tokens) + new_tokens
        return max(0, -(-total // self.page_size) - len(request.pages))

    def can_reserve(self, request_id: str, new_tokens: int) -> bool:
        """Whether :meth:`reserve` would succeed now."""
        request = self._requests[request_id]
        if len(request.tokens) + new_tokens > self.max_seq_len:
            return False
        return self.pages_needed(request_id, new_tokens) <= self.pool.num_available

    def reserve(self, request_id: str, new_tokens: int) -> None:
        """Make room for ``new_tokens`` tokens after the committed ones (capacity >= length + new_tokens).

        Not cumulative: reserving 4 then 2 before any commit leaves room for 4. All-or-nothing: on
        :class:`KVCacheExhausted` (pool empty, or past ``max_seq_len``) nothing is allocated and the
        request is unchanged.
        """
        request = self._requests[request_id]
        total = len(request.tokens) + new_tokens
        if total > self.max_seq_len:
            raise KVCacheExhausted(f"request {request_id} would exceed max_seq_len {self.max_seq_len}")
        need = -(-total // self.page_size) - len(request.pages)
        if need > 0:
            request.pages.extend(self.pool.allocate_many(need))
            self._sync_row(request)

    def commit(self, request_id: str, tokens: Sequence[int]) -> None:
        """Record tokens whose K/V the graph has now written; register pages that became full."""
        request = self._requests[request_id]
        if len(request.tokens) + len(tokens) > len(request.pages) * self.page_size:
            raise ValueError(f"request {request_id}: committing {len(tokens)} tokens past its reserved "
                             f"capacity {len(request.pages) * self.page_size}; reserve first")
        request.tokens.extend(tokens)
        full = len(request.tokens) // self.page_size
        if request.num_hashed >= full:
            return
        if not request.chain_ok:
            request.num_hashed = full
            return
        ps = self.page_size
        for i in range(request.num_hashed, full):
            page_tokens = tuple(request.tokens[i * ps:(i + 1) * ps])
            parent = request.chain
            h = page_hash(None if parent is None else parent.hash, page_tokens)
            node = self.pool.register(request.pages[i], h, page_tokens, parent)
            if node is None:  # a collision: later pages' prefix can no longer be named by the chain
                request.chain_ok = False
                break
            request.chain = node
        request.num_hashed = full

    def trim(self, request_id: str) -> int:
        """Release the reserved pages past the request's committed tokens; returns how many were released.

        Speculative decoding reserves room for draft tokens and commits only the accepted ones: the pages that
        held nothing but rejected drafts go back to the pool here. They were never committed, so never
        registered in the prefix cache; the partly filled last page stays the request's own."""
        request = self._requests[request_id]
        keep = -(-len(request.tokens) // self.page_size)
        extra = request.pages[keep:]
        if not extra:
            return 0
        del request.pages[keep:]
        for page in reversed(extra):
            self.pool.decref(page)
        self._sync_row(request)
        return len(extra)

    def truncate(self, request_id: str, length: int) -> None:
        """Forget the committed tokens past ``length`` (a draft model's rejected proposals) and release the pages
        left empty. Only for requests whose pages past ``length`` were never published in the prefix cache (a
        manager without prefix caching, or a request claimed with ``reuse_prefix=False``): a registered page would
        otherwise be overwritten under its cached content, so that is a ValueError."""
        request = self._requests[request_id]
        if not 0 <= length <= len(request.tokens):
            raise ValueError(f"request {request_id}: cannot truncate {len(request.tokens)} tokens to {length}")
        full = length // self.page_size
        if request.num_hashed > full and (request.chain_ok or any(
                self.pool.entry(page) is not None for page in request.pages[full:request.num_hashed])):
            raise ValueError(f"request {request_id}: truncating to {length} tokens would rewrite a page of the "
                             "prefix cache; speculative rollback needs prefix caching off for this cache")
        del request.tokens[length:]
        request.num_hashed = min(request.num_hashed, full)
        self.trim(request_id)

    def fork(self, src: str, dst: str) -> None:
        """Start ``dst`` as a copy of ``src``'s committed tokens (beam search, parallel sampling).

        Full pages are shared (references taken); the partially filled last page is copied into a new
        page in every layer's K and V buffer right away, since both requests will write to it next.
        Reserved-but-empty pages of ``src`` are not shared. Raises :class:`KVCacheExhausted`, changing
        nothing, when no page is available for the copy.
        """
        if dst in self._requests:
            raise ValueError(f"request {dst} already holds KV cache pages")
        source = self._requests[src]
        length = len(source.tokens)
        full, partial = divmod(length, self.page_size)
        copy = self.pool.allocate() if partial else None
        request = _Request(self._take_row(), list(source.prompt))
        for page in source.pages[:full]:
            self.pool.incref(page)
        request.pages = source.pages[:full]
        if copy is not None:
            src_rows = range(source.pages[full] * self.page_size, source.pages[full] * self.page_size + partial)
            dst_rows = range(copy * self.page_size, copy * self.page_size + partial)
            for buffer in self.all_buffers:
                self.backend.copy_rows(buffer, dst_rows, src_rows)
            request.pages.append(copy)
        request.tokens = list(source.tokens)
        request.num_hashed, request.chain, request.chain_ok = source.num_hashed, source.chain, source.chain_ok
        self._requests[dst] = request
        self._sync_row(request)

    def release(self, request_id: str) -> None:
        """Drop the request's pages: cached pages become evictable, the others free.

        Pages are released last first, so among them the tail (least likely to be shared) is evicted first
        and a prefix normally outlives its continuation (a continuation without its prefix is unreachable).
        """
        request = self._requests.pop(request_id)
        for page in reversed(request.pages):
            self.pool.decref(page)
        self._table[request.row, :len(request.pages)] = SCRATCH_PAGE
        self._free_rows.append(request.row)

    def preempt(self, request_id: str) -> list[int]:
        """Release the request to make room for others; returns its tokens, to claim again later.

        The tokens are the committed ones followed by any prompt tokens not computed yet; claiming them
        again recomputes only what the prefix cache no longer holds.
        """
        request = self._requests[request_id]
        tokens = request.tokens + request.prompt[len(request.tokens):]
        self.release(request_id)
        self.preemptions += 1
        logger.debug("preempted request %s (%d tokens)", request_id, len(tokens))
        return tokens

    def release_all(self) -> None:
        for request_id in list(self._requests):
            self.release(request_id)

    # batches ------------------------------------------------------------------------------------------
    def batch_inputs(self, request_ids: Sequence[str], new_token_counts: Sequence[int] | np.ndarray,
                     seq_len: int, max_pages: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The page table and slot mapping for one step of the graph.

        Row ``b`` feeds ``new_token_counts[b]`` new tokens (at positions ``cache_length .. + n - 1``),
        padded to ``seq_len``. Returns:

        - ``page_table``: int32 ``[batch, max_pages]``, each row the pages covering its positions up to
          the last new token, padded with the scratch page 0; ``max_pages`` defaults to the batch's widest
          row (pass a fixed width for graphs or engines with static shapes);
        - ``slot_mapping``: int64 ``[batch, seq_len]``, the buffer row where each new token's K/V goes
          (``page * page_size + offset``), and row 0 (in the scratch page) for padding.

        The new tokens must have been reserved. Nothing is committed: call :meth:`commit` after the step.
        """
        requests = self._requests
        ps = self.page_size
        batch = len(request_ids)
        if isinstance(new_token_counts, np.ndarray):
            new_token_counts = new_token_counts.tolist()
        if len(new_token_counts) != batch:
            raise ValueError(f"{len(new_token_counts)} token counts for {batch} requests")
        # One Python pass validates and collects per-row scalars: for decode-sized batches this is cheaper
        # than a dozen small numpy calls (each costs microseconds regardless of size).
        rows = [0] * batch
        lengths = [0] * batch
        counts = [0] * batch
        width = 0
        extra = False  # some row holds reserved pages past its last new token (multi-step reservations)
        for b, request_id in enumerate(request_ids):
            request = requests[request_id]
            n = int(new_token_counts[b])
            length = len(request.tokens)
            end = length + n
            held = len(request.pages)
            if not 0 <= n <= seq_len:
                raise ValueError(f"request {request_id}: {n} new tokens, must lie in 0..seq_len={seq_len}")
            if end > held * ps:
                raise ValueError(f"request {request_id}: {n} new tokens past its {held} reserved pages; "
                                 "reserve first")
            need = -(-end // ps)
            if need > width:
                width = need
            if held > need:
                extra = True
            rows[b], lengths[b], counts[b] = request.row, length, n
        if max_pages is not None:
            if max_pages < width:
                raise ValueError(f"max_pages {max_pages} < {width} pages needed by the batch")
            width = max_pages
        stored = min(width, self.max_pages_per_seq)
        table = self._table[:, :stored].take(rows, axis=0)  # a copy of only the columns needed
        if extra:  # hide reserved pages past each row's last new token: padding reads the scratch page
            for b in range(batch):
                table[b, -(-(lengths[b] + counts[b]) // ps):] = SCRATCH_PAGE
        if stored < width:
            table = np.concatenate([table, np.zeros((batch, width - stored), np.int32)], axis=1)
        if seq_len == 1:  # decode: one slot per row, computed directly
            slots = [0] * batch
            for b in range(batch):
                if counts[b]:
                    position = lengths[b]
                    slots[b] = requests[request_ids[b]].pages[position // ps] * ps + position % ps
            return table, np.array(slots, dtype=np.int64).reshape(batch, 1)
        steps = self._positions[:seq_len] if seq_len <= len(self._positions) else np.arange(seq_len)
        valid = steps < np.array(counts, dtype=np.int64)[:, None]
        positions = np.where(valid, np.array(lengths, dtype=np.int64)[:, None] + steps, 0)
        pages = self._table[np.array(rows, dtype=np.intp)[:, None], positions // ps].astype(np.int64)
        slots = pages * ps + positions % ps
        slots[~valid] = SCRATCH_PAGE * ps
        return table, slots

    def bindings(self, page_major: bool = False) -> list[tuple[Any, Any]]:
        """Per layer, (key, value) views over the whole pool buffers; created once, then cached.

        Bind each as both the graph's cache input and its output: the graph's ScatterND writes the new
        K/V into the same memory, so nothing is copied per step. ``page_major`` views the same bytes as
        ``[num_pages, page_size, n_kv_heads, head_dim]``, the layout onnxruntime's contrib PagedAttention
        kernel reads (row ``page * page_size + offset`` is element ``[page, offset]`` of it).
        """
        if self._bindings is None or self._bindings_page_major != page_major:
            shape = ((self.pool.num_pages, self.page_size, self.params.n_kv_heads, self.params.head_dim)
                     if page_major else None)
            self._bindings = [(self.backend.view(k, shape=shape), self.backend.view(v, shape=shape))
                              for k, v in zip(self.key_buffers, self.value_buffers)]
            self._bindings_page_major = page_major
        return self._bindings

    # internals ----------------------------------------------------------------------------------------
    def _take_row(self) -> int:
        if not self._free_rows:
            old = len(self._table)
            self._table = np.concatenate([self._table, np.zeros_like(self._table)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _sync_row(self, request: _Request) -> None:
        n = len(request.pages)
        self._table[request.row, :n] = request.pages
        self._table[request.row, n:] = SCRATCH_PAGE

    # checks -------------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError unless pool and requests agree (O(pages + tokens); for tests).

        Besides the pool's own invariants: each page's reference count equals the number of live page
        tables holding it (this manager is the pool's only user); the array page tables mirror the lists;
        committed tokens fit in the reserved pages; a page shared by two requests is full in both.
        """
        self.pool.check_invariants()
        held = [0] * self.pool.num_pages
        for request_id, request in self._requests.items():
            n = len(request.pages)
            if len(request.tokens) > n * self.page_size or n > self.max_pages_per_seq:
                raise AssertionError(f"request {request_id}: {len(request.tokens)} tokens in {n} pages")
            if self._table[request.row, :n].tolist() != request.pages or self._table[request.row, n:].any():
                raise AssertionError(f"request {request_id}: page table array out of sync")
            if len(set(request.pages)) != n or SCRATCH_PAGE in request.pages:
                raise AssertionError(f"request {request_id}: bad page table {request.pages}")
            for page in request.pages:
                held[page] += 1
        if self._free_rows and self._table[self._free_rows].any():
            raise AssertionError("a free page-table row still names pages")
        for page in range(1, self.pool.num_pages):
            if self.pool.refcount(page) != held[page]:
                raise AssertionError(f"page {page}: reference count {self.pool.refcount(page)}, "
                                     f"held by {held[page]} page tables")
        for request_id, request in self._requests.items():
            full = len(request.tokens) // self.page_size
            for page in request.pages[full:]:
                if held[page] != 1:
                    raise AssertionError(f"request {request_id}: page {page} is written next but shared")
