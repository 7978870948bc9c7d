"""PagedKVCacheManager: prefix reuse, reservations, commits, fork, release, batch inputs, bindings.

The buffers are real numpy arrays; "the graph" is simulated by writing, at the rows the slot mapping
names, a value that depends on the whole prefix up to each token. Any page reused, shared, copied or
evicted wrongly then shows up as a wrong value in some live request's cache.
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.runtime.backends import OrtCpuBackend
from ember.runtime.kv_cache import KVCacheExhausted, KVCacheParams, KVCacheStrategy, PagedKVCacheManager, page_hash

PS = 4
PARAMS = KVCacheParams(dtype="float32", n_kv_heads=2, head_dim=3, num_layers=2)


def make(num_pages=16, page_size=PS, max_seq_len=32, **kwargs) -> PagedKVCacheManager:
    return PagedKVCacheManager(PARAMS, num_pages, page_size, max_seq_len, backend=OrtCpuBackend(), **kwargs)


def prefix_value(tokens) -> float:
    """What the simulated graph writes for the last of ``tokens``: a function of the whole prefix."""
    return float(hash(tuple(tokens)) % 1_000_003)


def run_step(kv: PagedKVCacheManager, batch: dict[str, list[int]], seq_len: int | None = None) -> None:
    """Reserve, build batch inputs, write K/V at the slots like the graph would, commit."""
    ids = list(batch)
    for rid in ids:
        kv.reserve(rid, len(batch[rid]))
    seq_len = seq_len or max(len(t) for t in batch.values())
    table, slots = kv.batch_inputs(ids, [len(batch[r]) for r in ids], seq_len)
    for b, rid in enumerate(ids):
        history = kv.tokens(rid)
        for t, token in enumerate(batch[rid]):
            history.append(token)
            value = prefix_value(history)
            for layer in range(PARAMS.num_layers):
                kv.keys[layer][slots[b, t]] = value + layer
                kv.values[layer][slots[b, t]] = -value - layer
    for rid in ids:
        kv.commit(rid, batch[rid])


def assert_cache_holds(kv: PagedKVCacheManager, rid: str) -> None:
    """Every committed position of ``rid`` holds the value its prefix produced."""
    tokens = kv.tokens(rid)
    if not tokens:
        return
    pages = np.array(kv.page_table(rid))
    positions = np.arange(len(tokens))
    rows = pages[positions // kv.page_size] * kv.page_size + positions % kv.page_size
    expected = np.array([prefix_value(tokens[:pos + 1]) for pos in positions])[:, None, None]
    for layer in range(PARAMS.num_layers):
        assert np.array_equal(kv.keys[layer][rows], np.broadcast_to(expected + layer, (len(rows), 2, 3))), rid
        assert np.array_equal(kv.values[layer][rows], np.broadcast_to(-expected - layer, (len(rows), 2, 3))), rid


def prefill(kv, rid, prompt) -> int:
    cached = kv.claim(rid, prompt)
    if cached < len(prompt):
        run_step(kv, {rid: prompt[cached:]})
    return cached


# sizing ---------------------------------------------------------------------------------------------
def test_buffers_shapes_and_bytes():
    kv = make(num_pages=10)
    assert len(kv.keys) == len(kv.values) == PARAMS.num_layers
    assert kv.keys[0].shape == (10 * PS, 2, 3) and kv.keys[0].dtype == np.float32
    assert kv.bytes_per_page == PS * PARAMS.bytes_per_token == PS * 2 * 2 * 2 * 3 * 4
    assert kv.nbytes == 10 * kv.bytes_per_page
    assert kv.free_pages == 9 and kv.max_pages_per_seq == 8


def test_int8_cache_counts_one_byte_per_element():
    params = KVCacheParams(dtype="int8", n_kv_heads=2, head_dim=3, num_layers=2)
    kv = PagedKVCacheManager(params, 4, PS, 8, backend=OrtCpuBackend())
    assert kv.keys[0].dtype == np.int8 and kv.bytes_per_page == PS * 2 * 2 * 2 * 3


def test_from_memory_sizes_the_pool_from_a_byte_budget():
    page = PagedKVCacheManager.page_bytes(PARAMS, PS)
    kv = PagedKVCacheManager.from_memory(PARAMS, 20 * page + page // 2, PS, 32, backend=OrtCpuBackend())
    assert kv.num_pages == 20 and kv.nbytes <= 20 * page + page // 2
    assert PagedKVCacheManager.required_bytes(PARAMS, PS, 32, num_sequences=2) == (1 + 16) * page
    with pytest.raises(ValueError, match="needs"):
        PagedKVCacheManager.from_memory(PARAMS, 8 * page, PS, 32, backend=OrtCpuBackend())  # 32 tokens need 8 pages + scratch


def test_page_size_must_match_a_paged_graph():
    params = KVCacheParams(dtype="float32", n_kv_heads=2, head_dim=3, num_layers=2,
                           cache_strategy=KVCacheStrategy.PAGED, page_size=16)
    PagedKVCacheManager(params, 4, 16, 32, backend=OrtCpuBackend())
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCacheManager(params, 4, 8, 32, backend=OrtCpuBackend())


# requests ---------------------------------------------------------------------------------------------
def test_lifecycle_without_prefix_cache_hit():
    kv = make()
    prompt = list(range(10))
    assert kv.claim("a", prompt) == 0
    assert kv.page_table("a") == [] and kv.cache_length("a") == 0
    kv.reserve("a", 10)
    assert len(kv.page_table("a")) == 3 and kv.capacity("a") == 12
    run_step(kv, {"a": prompt})
    assert kv.cache_length("a") == 10 and kv.pool.num_cached == 2  # two full pages registered
    run_step(kv, {"a": [10]})
    run_step(kv, {"a": [11]})
    assert kv.pool.num_cached == 3
    assert_cache_holds(kv, "a")
    kv.check_invariants()


def test_prefix_reuse_takes_the_longest_cached_run():
    kv = make()
    a = list(range(13))  # pages [0..3] [4..7] [8..11] + 1 token
    prefill(kv, "a", a)
    b = a[:8] + [99, 98, 97, 96, 95]  # shares two pages, diverges in the third
    assert kv.match_prefix(b) == 8
    assert kv.claim("b", b) == 8
    assert kv.page_table("b") == kv.page_table("a")[:2]
    assert [kv.pool.refcount(p) for p in kv.page_table("a")] == [2, 2, 1, 1]
    run_step(kv, {"b": b[8:]})
    assert_cache_holds(kv, "a")
    assert_cache_holds(kv, "b")
    assert kv.prompt_tokens_requested == 26 and kv.prompt_tokens_cached == 8
    kv.check_invariants()


def test_prefix_survives_release_as_evictable_pages():
    kv = make()
    a = list(range(9))
    prefill(kv, "a", a)
    kv.release("a")
    assert kv.pool.num_evictable == 2 and kv.pool.num_referenced == 0
    assert kv.claim("b", a) == 8
    assert kv.pool.num_evictable == 0
    run_step(kv, {"b": a[8:]})
    assert_cache_holds(kv, "b")


def test_last_prompt_token_is_always_recomputed():
    kv = make()
    a = list(range(12))  # exactly three full pages
    prefill(kv, "a", a)
    assert kv.pool.num_cached == 3
    # The same 12 tokens again: serving all of them would leave no token to produce logits from, so
    # the third page is recomputed (reusing 11 tokens would need a partial page).
    assert kv.claim("b", a) == 8
    assert kv.claim("c", a + [12]) == 12
    assert kv.claim("d", a[:1]) == 0
    assert kv.claim("e", []) == 0


def test_partially_matching_page_is_not_reused():
    kv = make()
    a = list(range(10))  # two full pages and a partial one [8, 9]
    prefill(kv, "a", a)
    assert kv.claim("b", a + [10, 11, 12]) == 8  # the partial page is never shared
    assert kv.claim("c", [0, 1, 2, 3, 4, 5, 6, 99, 8, 9]) == 4  # the second page differs in its last token


def test_counters_track_requested_and_cached_prompt_tokens():
    kv = make()
    prefill(kv, "a", list(range(9)))
    prefill(kv, "b", list(range(9)))
    assert kv.prompt_tokens_requested == 18 and kv.prompt_tokens_cached == 8
    stats = kv.stats()
    assert stats["prompt_tokens_cached"] == 8 and stats["cache_hits"] == 2 and stats["active"] == 2


def test_collision_in_the_pool_is_a_miss_for_the_manager():
    kv = make()
    prompt = list(range(9))
    # Another page is cached under the hash of the prompt's first page, with other tokens.
    intruder = kv.pool.allocate()
    kv.pool.register(intruder, page_hash(None, prompt[:4]), (7, 7, 7, 7))
    kv.pool.decref(intruder)
    assert kv.claim("a", prompt) == 0
    run_step(kv, {"a": prompt})
    # Page 0's hash is taken, so the chain stops: no page of "a" is registered (its second page's hash
    # would name a prefix the index cannot vouch for).
    assert all(kv.pool.entry(p) is None for p in kv.page_table("a"))
    assert_cache_holds(kv, "a")
    kv.check_invariants()


def test_duplicate_prefix_computed_twice_keeps_one_cached_copy():
    kv = make()
    prompt = list(range(9))
    kv.claim("a", prompt)
    kv.claim("b", prompt)  # nothing cached yet: both compute the prompt
    run_step(kv, {"a": prompt, "b": prompt})
    assert kv.pool.num_cached == 2
    assert all(kv.pool.entry(p) is None for p in kv.page_table("b"))
    # b's next full page still chains onto the cached copies of its (identical) first two pages.
    run_step(kv, {"b": [9, 10, 11]})
    assert kv.pool.num_cached == 3
    assert kv.claim("c", prompt + [9, 10, 11, 12]) == 12
    assert kv.page_table("c") == kv.page_table("a")[:2] + kv.page_table("b")[2:3]
    assert_cache_holds(kv, "c")
    b_duplicates = kv.page_table("b")[:2]
    kv.release("b")
    kv.release("a")
    assert all(kv.pool.refcount(p) == 0 and kv.pool.entry(p) is None for p in b_duplicates)  # free
    assert_cache_holds(kv, "c")
    kv.release("c")
    assert kv.pool.num_evictable == 3 and kv.pool.num_referenced == 0
    kv.check_invariants()


def test_lru_eviction_reuses_the_oldest_released_prefix_first():
    kv = make(num_pages=5)  # 4 usable pages
    prefill(kv, "old", [1] * 5)  # two pages, one full and cached
    prefill(kv, "new", [2] * 5)
    kv.release("old")
    kv.release("new")
    assert kv.pool.num_evictable == 2 and kv.pool.num_free == 2
    kv.claim("x", [3] * 12)
    kv.reserve("x", 12)  # 3 pages: 2 free, then evict the least recently used cached page
    assert kv.pool.evictions == 1
    assert kv.match_prefix([1] * 5) == 0 and kv.match_prefix([2] * 5) == 4
    kv.check_invariants()


def test_reserve_is_all_or_nothing():
    kv = make(num_pages=6, max_seq_len=64)  # 5 usable pages
    kv.claim("a", list(range(8)))
    kv.reserve("a", 8)
    before = (kv.page_table("a"), kv.free_pages, kv.pool.allocations)
    assert kv.pages_needed("a", 8 + 13) == 4 and not kv.can_reserve("a", 8 + 13)
    with pytest.raises(KVCacheExhausted):
        kv.reserve("a", 8 + 13)
    assert (kv.page_table("a"), kv.free_pages, kv.pool.allocations) == before
    assert kv.can_reserve("a", 8 + 12)
    kv.reserve("a", 8 + 12)
    assert kv.free_pages == 0
    kv.check_invariants()


def test_reserve_is_not_cumulative_and_bounded_by_max_seq_len():
    kv = make(max_seq_len=8)
    kv.claim("a", [1, 2, 3])
    kv.reserve("a", 3)
    kv.reserve("a", 2)
    assert len(kv.page_table("a")) == 1
    with pytest.raises(KVCacheExhausted, match="max_seq_len"):
        kv.reserve("a", 9)
    assert not kv.can_reserve("a", 9)


def test_commit_past_the_reservation_is_an_error():
    kv = make()
    kv.claim("a", [1, 2])
    kv.reserve("a", 2)
    with pytest.raises(ValueError, match="reserve first"):
        kv.commit("a", [1, 2, 3, 4, 5])
    assert kv.cache_length("a") == 0


def test_claim_errors():
    kv = make(max_seq_len=8)
    kv.claim("a", [1])
    with pytest.raises(ValueError):
        kv.claim("a", [1])
    with pytest.raises(ValueError):
        kv.claim("b", list(range(9)))


def test_admission_estimate_counts_revived_pages():
    kv = make(num_pages=5)  # 4 usable
    prompt = list(range(9))
    prefill(kv, "a", prompt)
    kv.release("a")  # two cached pages, evictable
    assert kv.free_pages == 4
    queries = kv.pool.cache_queries
    # Claiming revives 2 evictable pages and needs 1 new page: 3 of the 4 available pages.
    assert kv.pages_to_admit(prompt) == 3 and kv.can_admit(prompt)
    assert kv.pages_to_admit(prompt, extra_tokens=8) == 5 and not kv.can_admit(prompt, extra_tokens=8)
    assert kv.pool.cache_queries == queries and kv.free_pages == 4  # estimates change nothing
    cached = kv.claim("b", prompt)
    kv.reserve("b", len(prompt) - cached)
    assert kv.free_pages == 1


def test_fork_shares_full_pages_and_copies_the_partial_one():
    kv = make()
    prefill(kv, "src", list(range(10)))
    kv.fork("src", "dst")
    src_pages, dst_pages = kv.page_table("src"), kv.page_table("dst")
    assert dst_pages[:2] == src_pages[:2] and dst_pages[2] != src_pages[2]
    assert kv.tokens("dst") == kv.tokens("src")
    assert_cache_holds(kv, "dst")
    kv.check_invariants()
    src_rows = kv.keys[0][src_pages[2] * PS:(src_pages[2] + 1) * PS].copy()
    run_step(kv, {"dst": [50, 51]})  # fills dst's copied last page
    run_step(kv, {"src": [60]})
    assert_cache_holds(kv, "src")
    assert_cache_holds(kv, "dst")
    assert np.array_equal(kv.keys[0][src_pages[2] * PS:src_pages[2] * PS + 2], src_rows[:2])
    kv.release("src")
    assert_cache_holds(kv, "dst")
    kv.check_invariants()


def test_fork_without_a_page_for_the_copy_changes_nothing():
    kv = make(num_pages=4)  # 3 usable
    prefill(kv, "src", list(range(10)))
    assert kv.free_pages == 0
    with pytest.raises(KVCacheExhausted):
        kv.fork("src", "dst")
    assert not kv.contains("dst")
    kv.check_invariants()
    run_step(kv, {"src": [10, 11]})
    kv.fork("src", "dst")  # page-aligned: nothing to copy
    assert kv.page_table("dst") == kv.page_table("src")
    kv.check_invariants()


def test_release_everything_leaves_only_free_or_evictable_pages():
    kv = make(num_pages=12)
    prefill(kv, "a", list(range(11)))
    prefill(kv, "b", list(range(6)))
    kv.fork("a", "c")
    run_step(kv, {"c": [1, 2, 3]})
    kv.release_all()
    kv.check_invariants()
    assert kv.num_active == 0 and kv.pool.num_referenced == 0
    assert kv.pool.num_free + kv.pool.num_evictable == kv.pool.num_usable


def test_preempt_returns_tokens_and_reclaims_from_cache():
    kv = make()
    prompt = list(range(10))
    prefill(kv, "a", prompt)
    run_step(kv, {"a": [42]})
    tokens = kv.preempt("a")
    assert tokens == prompt + [42] and kv.preemptions == 1 and not kv.contains("a")
    assert kv.claim("a", tokens) == 8
    # A request preempted before its prompt was computed gives back the whole prompt.
    kv.claim("b", [5, 6, 7])
    assert kv.preempt("b") == [5, 6, 7]


def test_prefix_caching_disabled():
    kv = make(enable_prefix_caching=False)
    prompt = list(range(9))
    prefill(kv, "a", prompt)
    assert kv.pool.num_cached == 0
    assert kv.claim("b", prompt) == 0
    kv.release("a")
    assert kv.pool.num_evictable == 0 and kv.pool.cache_queries == 0


# batch inputs -----------------------------------------------------------------------------------------
def test_batch_inputs_hand_computed():
    kv = make(num_pages=16)
    kv.claim("a", [1, 2, 3, 4, 5])
    kv.reserve("a", 5)  # pages 1, 2 (a fresh pool hands out 1, 2, 3, ... in order)
    kv.commit("a", [1, 2, 3, 4, 5])
    kv.reserve("a", 1)  # position 5 fits in page 2
    kv.claim("b", [7, 8, 9])
    kv.reserve("b", 3)  # page 3
    assert kv.page_table("a") == [1, 2] and kv.page_table("b") == [3]
    table, slots = kv.batch_inputs(["a", "b"], [1, 3], 3)
    assert table.dtype == np.int32 and slots.dtype == np.int64
    assert table.tolist() == [[1, 2], [3, 0]]
    # a: position 5 -> page 2, offset 1 -> row 9; padding -> row 0 of the scratch page
    # b: positions 0..2 -> page 3 -> rows 12, 13, 14
    assert slots.tolist() == [[9, 0, 0], [12, 13, 14]]
    assert kv.cache_lengths(["a", "b"]).tolist() == [5, 0]

    kv.reserve("a", 4)  # multi-step: positions 5..8 -> a third page (4)
    assert kv.page_table("a") == [1, 2, 4]
    table, slots = kv.batch_inputs(["a"], [1], 1)
    assert table.tolist() == [[1, 2]]  # the reserved page past this step reads as scratch
    assert slots.tolist() == [[9]]
    table, _ = kv.batch_inputs(["b", "a"], [0, 1], 1, max_pages=4)
    assert table.tolist() == [[0, 0, 0, 0], [1, 2, 0, 0]]
    with pytest.raises(ValueError):
        kv.batch_inputs(["a"], [1], 1, max_pages=1)
    with pytest.raises(ValueError, match="reserve first"):
        kv.batch_inputs(["b"], [5], 5)
    with pytest.raises(ValueError):
        kv.batch_inputs(["a"], [2], 1)


def test_batch_inputs_decode_and_general_paths_agree():
    kv = make(num_pages=32, max_seq_len=64)
    for i in range(5):
        prefill(kv, f"r{i}", list(range(i, 3 + 4 * i)))
        kv.reserve(f"r{i}", 1)
    ids = [f"r{i}" for i in (3, 0, 4, 1, 2)]
    table1, slots1 = kv.batch_inputs(ids, [1] * 5, 1)
    table2, slots2 = kv.batch_inputs(ids, np.ones(5, np.int64), 2)
    assert np.array_equal(table1, table2) and np.array_equal(slots1[:, 0], slots2[:, 0])
    assert not slots2[:, 1].any()


def test_bindings_alias_the_buffers_and_are_cached():
    kv = make()
    bindings = kv.bindings()
    assert len(bindings) == PARAMS.num_layers and kv.bindings() is bindings
    key, value = bindings[1]
    assert key.shape() == list(kv.keys[1].shape)
    assert key.data_ptr() == kv.keys[1].ctypes.data and value.data_ptr() == kv.values[1].ctypes.data


# random operation sequences ---------------------------------------------------------------------------
