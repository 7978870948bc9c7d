"""PagePool: the scratch page, reference counts, the free queue, prefix-cache lookups and LRU eviction."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ember.runtime.kv_cache import SCRATCH_PAGE, KVCacheExhausted, PagePool, page_hash

PS = 4


def full_page(pool: PagePool, tokens, parent=None):
    """Allocate a page and register it as holding ``tokens`` after ``parent``; returns (page, entry)."""
    page = pool.allocate()
    entry = pool.register(page, page_hash(None if parent is None else parent.hash, tokens), tokens, parent)
    return page, entry


def test_scratch_page_is_never_handed_out():
    pool = PagePool(5, PS)
    pages = [pool.allocate() for _ in range(4)]
    assert sorted(pages) == [1, 2, 3, 4] and SCRATCH_PAGE not in pages
    with pytest.raises(KVCacheExhausted):
        pool.allocate()
    assert pool.allocations == 4 and pool.num_referenced == 4 and pool.num_available == 0
    pool.check_invariants()


def test_pool_needs_a_page_besides_scratch():
    with pytest.raises(ValueError):
        PagePool(1, PS)


def test_free_is_lifo_and_double_free_raises():
    pool = PagePool(8, PS)
    a, b = pool.allocate(), pool.allocate()
    pool.decref(a)
    assert pool.allocate() == a  # the most recently freed page is reused first
    pool.decref(a)
    with pytest.raises(ValueError, match="double free"):
        pool.decref(a)
    pool.incref(b)
    assert pool.refcount(b) == 2
    pool.decref(b)
    pool.decref(b)
    assert pool.num_free == 7
    with pytest.raises(ValueError):
        pool.incref(b)  # a free page holds nothing to share
    pool.check_invariants()


def test_allocate_many_is_all_or_nothing():
    pool = PagePool(5, PS)
    pool.allocate()
    with pytest.raises(KVCacheExhausted):
        pool.allocate_many(4)
    assert pool.num_available == 3 and pool.allocations == 1
    assert len(pool.allocate_many(3)) == 3
    pool.check_invariants()


def test_cached_page_becomes_evictable_then_is_revived_by_lookup():
    pool = PagePool(8, PS)
    tokens = (1, 2, 3, 4)
    page, entry = full_page(pool, tokens)
    assert entry.page == page and pool.entry(page) is entry and pool.num_cached == 1
    pool.decref(page)
    assert pool.num_evictable == 1 and pool.num_free == 6
    hit = pool.lookup(page_hash(None, tokens), tokens)
    assert hit is entry and pool.refcount(page) == 1 and pool.num_evictable == 0
    assert (pool.cache_queries, pool.cache_hits) == (1, 1)
    assert pool.lookup(page_hash(None, (1, 2, 3, 5)), (1, 2, 3, 5)) is None
    assert (pool.cache_queries, pool.cache_hits) == (2, 1)
    pool.check_invariants()


def test_unhashed_page_returns_to_free_queue():
    pool = PagePool(4, PS)
    page = pool.allocate()
    pool.decref(page)
    assert pool.num_free == 3 and pool.num_evictable == 0


def test_hash_collision_never_returns_a_page_with_other_tokens():
    pool = PagePool(8, PS)
    forced = 12345  # the same hash for two different token sequences
    a, b = (1, 2, 3, 4), (9, 9, 9, 9)
    page_a = pool.allocate()
    entry_a = pool.register(page_a, forced, a)
    assert pool.lookup(forced, b) is None
    assert pool.lookup(forced, a) is entry_a
    page_b = pool.allocate()
    assert pool.register(page_b, forced, b) is None  # collision: b stays unregistered
    assert pool.entry(page_b) is None
    pool.decref(page_b)
    assert pool.refcount(page_b) == 0 and pool.num_evictable == 0  # freed, not cached
    assert pool.lookup(forced, a) is entry_a
    pool.check_invariants()


def test_same_tokens_after_a_different_parent_is_a_miss():
    pool = PagePool(8, PS)
    _, root_a = full_page(pool, (1, 1, 1, 1))
    _, root_b = full_page(pool, (2, 2, 2, 2))
    child = (7, 7, 7, 7)
    forced = 99
    child_page = pool.allocate()
    entry = pool.register(child_page, forced, child, root_a)
    assert pool.lookup(forced, child, root_b) is None  # equal hash and tokens, other prefix
    assert pool.lookup(forced, child, None) is None
    assert pool.lookup(forced, child, root_a) is entry


def test_register_duplicate_prefix_returns_the_existing_entry():
    pool = PagePool(8, PS)
    tokens = (5, 6, 7, 8)
    first, entry = full_page(pool, tokens)
    second = pool.allocate()
    assert pool.register(second, page_hash(None, tokens), tokens) is entry
    assert pool.entry(second) is None
    pool.decref(second)
    pool.decref(first)
    assert pool.num_evictable == 1 and pool.num_free == 6


def test_register_rejects_partial_scratch_and_unowned_pages():
    pool = PagePool(8, PS)
    page = pool.allocate()
    with pytest.raises(ValueError):
        pool.register(page, 1, (1, 2))
    with pytest.raises(ValueError):
        pool.register(SCRATCH_PAGE, 1, (1, 2, 3, 4))
    pool.register(page, 1, (1, 2, 3, 4))
    with pytest.raises(ValueError):
        pool.register(page, 2, (1, 2, 3, 4))
    other = pool.allocate()
    pool.decref(other)
    with pytest.raises(ValueError):
        pool.register(other, 3, (1, 2, 3, 4))


def test_lru_eviction_order_and_hash_dropped():
    pool = PagePool(4, PS)  # 3 usable pages
    seqs = [(i, i, i, i) for i in range(3)]
    pages = [full_page(pool, s)[0] for s in seqs]
    for i in (1, 0, 2):  # released in this order: page of seq 1 is the least recently used
        pool.decref(pages[i])
    assert pool.num_free == 0 and pool.num_evictable == 3
    assert pool.lookup(page_hash(None, seqs[0]), seqs[0]) is not None  # revived: out of the LRU
    pool.decref(pages[0])  # ...and now the most recently used
    evicted = []
    for _ in range(3):
        page = pool.allocate()
        evicted.append(page)
        assert pool.entry(page) is None
    assert evicted == [pages[1], pages[2], pages[0]]
    assert pool.evictions == 3 and pool.num_cached == 0
    assert pool.lookup(page_hash(None, seqs[1]), seqs[1]) is None
    pool.check_invariants()


def test_free_pages_are_used_before_evicting():
    pool = PagePool(4, PS)
    cached, _ = full_page(pool, (1, 2, 3, 4))
    pool.decref(cached)
    a, b = pool.allocate(), pool.allocate()
    assert cached not in (a, b) and pool.evictions == 0
    assert pool.allocate() == cached and pool.evictions == 1


def test_reregistered_prefix_does_not_revive_stale_children():
    pool = PagePool(8, PS)
    parent_tokens, child_tokens = (1, 2, 3, 4), (5, 6, 7, 8)
    parent_page, parent = full_page(pool, parent_tokens)
    child_page, child = full_page(pool, child_tokens, parent)
    pool.decref(child_page)
    pool.decref(parent_page)
    assert pool.clear_cache() == 2 and pool.num_free == 7
    # The same prefix cached again gets a new entry; a child registered under the old one must not match
    # through it even if its hash and tokens are equal (it was built on what the old entry stood for).
    _, parent2 = full_page(pool, parent_tokens)
    assert parent2 is not parent and parent2.serial != parent.serial
    stale = pool.allocate()
    assert pool.register(stale, child.hash, child_tokens, parent) is not None
    assert pool.lookup(child.hash, child_tokens, parent2) is None
    pool.check_invariants()


def test_check_invariants_detects_corruption():
    pool = PagePool(4, PS)
    page = pool.allocate()
    pool._free.append(page)  # a referenced page also in the free queue
    with pytest.raises(AssertionError):
        pool.check_invariants()


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / share / release / register / lookup under pressure, with forced hash collisions.

    The model tracks, per page, how many references the machine holds and which exact prefix (tuple of
    pages' tokens) it was registered with; a lookup hit must always return a page whose prefix equals the
    one asked for. Hashes are taken modulo 4 so that collisions happen all the time.
    """

    def __init__(self):
        super().__init__()
        self.pool = PagePool(7, 2)
        self.held: dict[int, int] = {}  # page -> references we hold
        self.prefix: dict[int, tuple] = {}  # registered page -> the prefix it holds

    def small_hash(self, parent, tokens):
        return page_hash(None if parent is None else parent.hash, tokens) % 4

    def take(self, page):
        self.held[page] = self.held.get(page, 0) + 1

    @rule()
    def allocate(self):
        if self.pool.num_available == 0:
            with pytest.raises(KVCacheExhausted):
                self.pool.allocate()
            return
        page = self.pool.allocate()
        assert page != SCRATCH_PAGE and self.held.get(page, 0) == 0
        self.prefix.pop(page, None)  # evicted or free: whatever it cached is gone
        self.take(page)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def share(self, i):
        page = sorted(self.held)[i % len(self.held)]
        self.pool.incref(page)
        self.take(page)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def release(self, i):
        page = sorted(self.held)[i % len(self.held)]
        self.pool.decref(page)
        self.held[page] -= 1
        if not self.held[page]:
            del self.held[page]

    def parent_entry(self, i):
        cached = sorted(p for p in self.prefix if self.pool.entry(p) is not None)
        if not cached or i % (len(cached) + 1) == len(cached):
            return None, ()
        page = cached[i % (len(cached) + 1)]
        return self.pool.entry(page), self.prefix[page]

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100), j=st.integers(0, 100), tokens=st.tuples(st.integers(0, 1), st.integers(0, 1)))
    def register(self, i, j, tokens):
        page = sorted(self.held)[i % len(self.held)]
        if self.pool.entry(page) is not None:
            return
        parent, parent_prefix = self.parent_entry(j)
        result = self.pool.register(page, self.small_hash(parent, tokens), tokens, parent)
        if result is not None and result.page == page:
            self.prefix[page] = parent_prefix + (tokens,)
        elif result is not None:
            assert self.prefix[result.page] == parent_prefix + (tokens,)

    @rule(j=st.integers(0, 100), tokens=st.tuples(st.integers(0, 1), st.integers(0, 1)))
    def lookup(self, j, tokens):
        parent, parent_prefix = self.parent_entry(j)
        entry = self.pool.lookup(self.small_hash(parent, tokens), tokens, parent)
        if entry is not None:
            assert self.prefix[entry.page] == parent_prefix + (tokens,)  # never another prefix's page
            self.take(entry.page)

    @invariant()
    def consistent(self):
        self.pool.check_invariants()
        for page in range(1, self.pool.num_pages):
            assert self.pool.refcount(page) == self.held.get(page, 0)

    def teardown(self):
        for page, count in self.held.items():
            for _ in range(count):
                self.pool.decref(page)
        self.pool.check_invariants()
        assert self.pool.num_referenced == 0
        assert self.pool.num_free + self.pool.num_evictable == self.pool.num_usable


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=50, stateful_step_count=30, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
