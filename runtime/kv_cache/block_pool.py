"""The page pool behind the PAGED KV cache: page ids, reference counts, and the prefix cache.

This module knows nothing about tensors; :mod:`.paged` owns the buffers and maps requests to pages. A page
is ``page_size`` consecutive token rows of every layer's K and V buffer; the pool only hands out page ids.

Every page other than the scratch page is, at any moment, exactly one of:

- **free**: in the free queue, holding nothing worth keeping;
- **evictable**: unreferenced but registered in the prefix cache (its K/V can still be reused by a later
  request with the same prefix); kept in least-recently-released order;
- **referenced**: its reference count (the number of page tables holding it) is positive.

Page 0 is the *scratch* (null) page and is never handed out. A batch is padded (short rows of the page
table, padding tokens of a ragged batch) and the graph still writes K/V for every position it is given
(``ScatterND`` over the slot mapping) and gathers every page-table entry: pointing padding at page 0 keeps
those writes and reads inside memory that no request owns, without a branch in the graph.

Prefix caching (as in vLLM and MAX): when a page fills up, the manager registers it under
``page_hash(parent_hash, tokens)``, chaining the hash of the page before it, so equal hashes mean equal
prefixes. A hash is a digest, so two different prefixes can share one; the pool therefore keeps each cached
page's tokens and its parent *entry* and compares both on lookup. The parent is compared by the serial
number of its :class:`CachedPage` entry (never reused: a page registered again gets a new serial), so a chain
of hits proves that every token of the prefix is equal, not merely its hash: a collision costs a cache miss,
never wrong K/V.

All operations are O(1) per page (a deque for the free queue, an ``OrderedDict`` as the LRU of evictable
pages, dicts for the hash index) except :meth:`PagePool.check_invariants`, which is meant for tests.
"""
from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Sequence

from .continuous import KVCacheExhausted

logger = logging.getLogger(__name__)

SCRATCH_PAGE = 0
"""The page that padding reads and writes; never allocated to a request."""


def page_hash(parent_hash: int | None, tokens: Sequence[int]) -> int:
    """The prefix-cache key of a full page: its tokens chained with the hash of the page before it.

    ``parent_hash`` is None for a sequence's first page. Python's hash of a tuple of ints is deterministic
    across processes (only str/bytes hashing is salted), fast, and 64 bits wide; collisions are harmless
    because :meth:`PagePool.lookup` compares tokens and parents as well.
    """
    return hash((parent_hash, tuple(tokens)))


class CachedPage:
    """A page registered in the prefix cache: page id, hash, tokens, and the serial of its parent entry.

    Entries are immutable and never reused: each gets a fresh ``serial`` and, when its page is evicted,
    leaves the index for good. So a serial stands for one exact prefix (this page's tokens after the parent
    serial's prefix). Children refer to their parent by serial rather than by object so that an evicted
    parent's entry (and its tokens) can be garbage collected.
    """

    __slots__ = ("page", "hash", "tokens", "parent_serial", "serial")

    def __init__(self, page: int, hash: int, tokens: tuple[int, ...], parent_serial: int, serial: int):
        self.page = page
        self.hash = hash
        self.tokens = tokens
        self.parent_serial = parent_serial
        self.serial = serial

    def __repr__(self) -> str:
        return (f"CachedPage(page={self.page}, hash={self.hash:#x}, tokens={len(self.tokens)}, "
                f"serial={self.serial}, parent_serial={self.parent_serial})")


_ROOT = 0  # the parent serial of a sequence's first page; entries are numbered from 1


def _serial(parent: CachedPage | None) -> int:
    return _ROOT if parent is None else parent.serial


class PagePool:
    """Page ids ``1 .. num_pages - 1`` with reference counts, a free queue and an LRU prefix cache.

    Counters (monotonic, for metrics and tests): ``allocations`` (pages handed out by :meth:`allocate`),
    ``evictions`` (cached pages dropped to satisfy an allocation), ``cache_queries`` and ``cache_hits``
    (calls to :meth:`lookup` and those that found a page).
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (page 0 is scratch), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._refcount = [0] * num_pages
        # LIFO reuse: the most recently freed page is handed out first, so a lightly loaded server keeps
        # touching the same few pages of the lazily mapped buffers instead of faulting in new ones.
        self._free: deque[int] = deque(range(num_pages - 1, SCRATCH_PAGE, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._entry: list[CachedPage | None] = [None] * num_pages
        self._index: dict[int, CachedPage] = {}
        self._next_serial = _ROOT + 1
        self.allocations = 0
        self.evictions = 0
        self.cache_queries = 0
        self.cache_hits = 0

    # sizes ------------------------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        """Pages that requests can ever hold (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages in the free queue (holding nothing)."""
        return len(self._free)

    @property
    def num_evictable(self) -> int:
        """Unreferenced pages kept for the prefix cache; an allocation may evict them."""
        return len(self._evictable)

    @property
    def num_available(self) -> int:
        """Pages an allocation can obtain right now: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_referenced(self) -> int:
        """Pages held by at least one page table."""
        return self.num_usable - self.num_available

    @property
    def num_cached(self) -> int:
        """Pages registered in the prefix cache, referenced or not."""
        return len(self._index)

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def entry(self, page: int) -> CachedPage | None:
        """The page's prefix-cache entry, or None when it is not registered."""
        return self._entry[page]

    def _cached(self, page: int) -> CachedPage:
        """The entry of an evictable page (evictable pages are cached ones)."""
        entry = self._entry[page]
        if entry is None:
            raise RuntimeError(f"page {page} is evictable but not cached")
        return entry

    def stats(self) -> dict[str, int]:
        return {
            "num_pages": self.num_pages, "page_size": self.page_size, "free": self.num_free,
            "evictable": self.num_evictable, "referenced": self.num_referenced, "cached": self.num_cached,
            "allocations": self.allocations, "evictions": self.evictions,
            "cache_queries": self.cache_queries, "cache_hits": self.cache_hits,
        }

    # allocation -------------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A page with reference count 1: a free one if any, else the least recently used evictable one.

        Evicting drops the page's hash from the index (its K/V will be overwritten).
        Raises :class:`KVCacheExhausted` when every usable page is referenced.
        """
        if self._free:
            page = self._free.pop()
        elif self._evictable:
            page, _ = self._evictable.popitem(last=False)
            del self._index[self._cached(page).hash]
            self._entry[page] = None
            self.evictions += 1
        else:
            raise KVCacheExhausted(f"all {self.num_usable} KV cache pages are in use")
        self._refcount[page] = 1
        self.allocations += 1
        return page

    def allocate_many(self, count: int) -> list[int]:
        """``count`` pages, or :class:`KVCacheExhausted` with nothing allocated (all-or-nothing)."""
        if count > self.num_available:
            raise KVCacheExhausted(
                f"need {count} KV cache pages, {self.num_available} of {self.num_usable} are available")
        return [self.allocate() for _ in range(count)]

    def incref(self, page: int) -> None:
        """Take one more reference to a page that is referenced or cached (reviving it from the LRU)."""
        count = self._refcount[page]
        if count == 0:
            if self._entry[page] is None:
                raise ValueError(f"page {page} is free; allocate it instead of taking a reference")
            del self._evictable[page]
        self._refcount[page] = count + 1

    def decref(self, page: int) -> None:
        """Drop one reference; at zero a cached page becomes evictable and any other page free."""
        count = self._refcount[page]
        if count <= 0:
            raise ValueError(f"page {page} is not referenced (double free?)")
        self._refcount[page] = count - 1
        if count == 1:
            if self._entry[page] is not None:
                self._evictable[page] = None  # most recently used: evicted last
            else:
                self._free.append(page)

    # prefix cache -----------------------------------------------------------------------------------
    def register(self, page: int, hash: int, tokens: Sequence[int],
                 parent: CachedPage | None = None) -> CachedPage | None:
        """Register a full, referenced page under ``hash`` (its tokens follow ``parent``'s prefix).

        Returns the entry that now stands for this prefix, for chaining the next page:

        - the page's new entry when the hash was not cached;
        - the existing entry when another page already caches the very same prefix (same tokens, same
          parent): this page stays unregistered (it is freed, not cached, when released) but the chain goes
          on, since its content is identical;
        - None when the hash is cached for a *different* prefix (a collision): the page stays unregistered
          and the caller must stop registering this sequence's later pages, whose chain is now unprovable.
        """
        if page == SCRATCH_PAGE:
            raise ValueError("the scratch page cannot be cached")
        if self._refcount[page] <= 0:
            raise ValueError(f"page {page} must be referenced to be registered")
        if self._entry[page] is not None:
            raise ValueError(f"page {page} is already registered")
        tokens = tuple(tokens)
        if len(tokens) != self.page_size:
            raise ValueError(f"only full pages are cached: {len(tokens)} tokens, page_size {self.page_size}")
        existing = self._index.get(hash)
        if existing is not None:
            if existing.tokens == tokens and existing.parent_serial == _serial(parent):
                return existing
            logger.debug("prefix cache hash collision on %#x; page %d not cached", hash, page)
            return None
        entry = CachedPage(page, hash, tokens, _serial(parent), self._next_serial)
        self._next_serial += 1
        self._index[hash] = entry
        self._entry[page] = entry
        return entry

    def peek(self, hash: int, tokens: Sequence[int], parent: CachedPage | None = None) -> CachedPage | None:
        """The cached entry for this exact prefix, or None; changes nothing (no reference, no counter)."""
        entry = self._index.get(hash)
        if entry is None or entry.parent_serial != _serial(parent) or entry.tokens != tuple(tokens):
            return None
        return entry

    def lookup(self, hash: int, tokens: Sequence[int], parent: CachedPage | None = None) -> CachedPage | None:
        """The cached entry for this exact prefix with one more reference taken on its page, or None.

        ``parent`` is the entry returned for the previous page of the same sequence (None for its first
        page); tokens and parent must both match, so a hash collision is a miss.
        """
        self.cache_queries += 1
        entry = self.peek(hash, tokens, parent)
        if entry is None:
            return None
        self.cache_hits += 1
        self.incref(entry.page)
        return entry

    def clear_cache(self) -> int:
        """Forget every evictable cached page (they become free); returns how many were dropped.

        Referenced pages keep their entries. Useful to measure without prefix caching, or after the
        weights behind the cached K/V changed.
        """
        dropped = 0
        while self._evictable:
            page, _ = self._evictable.popitem(last=False)
            del self._index[self._cached(page).hash]
            self._entry[page] = None
            self._free.append(page)
            dropped += 1
        return dropped

    # checks -----------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError unless the pool is consistent (O(num_pages); for tests and debugging).

        Every usable page is exactly one of free / evictable / referenced; reference counts are
        non-negative; the scratch page is never held; the hash index and the pages' entries agree.
        """
        def fail(message: str) -> None:
            raise AssertionError(f"PagePool invariant broken: {message}")

        free = set(self._free)
        if len(free) != len(self._free):
            fail("a page is in the free queue twice")
        evictable = set(self._evictable)
        if SCRATCH_PAGE in free or SCRATCH_PAGE in evictable or self._refcount[SCRATCH_PAGE] != 0:
            fail("the scratch page is in use")
        if self._entry[SCRATCH_PAGE] is not None:
            fail("the scratch page is cached")
        for page in range(1, self.num_pages):
            count = self._refcount[page]
            if count < 0:
                fail(f"page {page} has reference count {count}")
            states = (page in free) + (page in evictable) + (count > 0)
            if states != 1:
                fail(f"page {page} is in {states} states (free={page in free}, "
                     f"evictable={page in evictable}, refcount={count})")
            if page in free and self._entry[page] is not None:
                fail(f"free page {page} is still cached")
            if page in evictable and self._entry[page] is None:
                fail(f"evictable page {page} is not cached")
            entry = self._entry[page]
            if entry is not None and (entry.page != page or self._index.get(entry.hash) is not entry):
                fail(f"page {page}'s entry {entry!r} is not the one indexed under its hash")
        for hash, entry in self._index.items():
            if entry.hash != hash or self._entry[entry.page] is not entry:
                fail(f"hash {hash:#x} points to page {entry.page}, which does not hold it")
            if len(entry.tokens) != self.page_size:
                fail(f"cached page {entry.page} holds {len(entry.tokens)} tokens")
