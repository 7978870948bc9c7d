"""Property-based test of the paged KV cache manager: random claims, appends, forks, releases, preemptions and
allocation pressure (hypothesis state machine) never leak or double-free a page, keep reference counts equal to
the page-table references of live requests, and keep each request's cache holding exactly its own values."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ember.runtime.backends import OrtCpuBackend
from ember.runtime.kv_cache import KVCacheExhausted, PagedKVCacheManager

from .test_paged_kv_manager import PARAMS, assert_cache_holds, run_step

PROMPT_STEMS = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9], [7, 7, 7, 7, 7, 7, 7]]


class ManagerMachine(RuleBasedStateMachine):
    """Random claim / step / fork / release / preempt under memory pressure.

    After every step: the pool's invariants, refcounts equal to the page-table references of live requests
    (``check_invariants``), and every live request's cache holding exactly the K/V its own tokens produced.
    """

    def __init__(self):
        super().__init__()
        self.kv = PagedKVCacheManager(PARAMS, 10, 3, 18, backend=OrtCpuBackend())
        self.pending: dict[str, list[int]] = {}  # live request -> prompt tokens not computed yet
        self.counter = 0

    def pick(self, i):
        ids = sorted(self.pending)
        return ids[i % len(ids)]

    def new_id(self):
        self.counter += 1
        return f"r{self.counter}"

    @rule(stem=st.integers(0, len(PROMPT_STEMS) - 1), cut=st.integers(0, 7),
          tail=st.lists(st.integers(0, 2), max_size=4))
    def claim(self, stem, cut, tail):
        prompt = PROMPT_STEMS[stem][:cut] + tail or [0]
        rid = self.new_id()
        expected = self.kv.match_prefix(prompt)
        requested, served = self.kv.prompt_tokens_requested, self.kv.prompt_tokens_cached
        cached = self.kv.claim(rid, prompt)
        assert cached == expected and cached % self.kv.page_size == 0
        assert cached <= len(prompt) - 1 or cached == 0
        assert self.kv.prompt_tokens_requested == requested + len(prompt)
        assert self.kv.prompt_tokens_cached == served + cached
        self.pending[rid] = prompt[cached:]

    @precondition(lambda self: self.pending)
    @rule(picks=st.lists(st.integers(0, 100), min_size=1, max_size=3), chunk=st.integers(1, 4),
          token=st.integers(0, 2))
    def step(self, picks, chunk, token):
        batch = {}
        for i in picks:
            rid = self.pick(i)
            if rid in batch:
                continue
            new = self.pending[rid][:chunk] or [token] * min(chunk, 2)
            if self.kv.cache_length(rid) + len(new) > self.kv.max_seq_len:
                continue
            if not self.kv.can_reserve(rid, len(new)):
                table = self.kv.page_table(rid)
                with pytest.raises(KVCacheExhausted):
                    self.kv.reserve(rid, len(new))
                assert self.kv.page_table(rid) == table
                continue
            self.kv.reserve(rid, len(new))
            batch[rid] = new
        if batch:
            run_step(self.kv, batch, seq_len=max(len(t) for t in batch.values()) + 1)
            for rid, new in batch.items():
                self.pending[rid] = self.pending[rid][len(new):]

    @rule(token=st.integers(3, 5))
    def pressure(self, token):
        """A request that takes every available page, evicting cached prefixes."""
        length = min(self.kv.free_pages * self.kv.page_size, self.kv.max_seq_len)
        if length == 0:
            return
        rid = self.new_id()
        prompt = [token] * length
        cached = self.kv.claim(rid, prompt)
        if not self.kv.can_reserve(rid, length - cached):  # its own cache hits took evictable pages
            self.kv.release(rid)
            return
        run_step(self.kv, {rid: prompt[cached:]})
        self.pending[rid] = []

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(0, 100))
    def fork(self, i):
        src = self.pick(i)
        dst = self.new_id()
        partial = self.kv.cache_length(src) % self.kv.page_size
        if partial and self.kv.free_pages == 0:
            with pytest.raises(KVCacheExhausted):
                self.kv.fork(src, dst)
            assert not self.kv.contains(dst)
            return
        self.kv.fork(src, dst)
        self.pending[dst] = list(self.pending[src])

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(0, 100))
    def release(self, i):
        rid = self.pick(i)
        self.kv.release(rid)
        del self.pending[rid]

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(0, 100))
    def preempt(self, i):
        rid = self.pick(i)
        expected = self.kv.tokens(rid) + self.pending[rid]
        assert self.kv.preempt(rid) == expected
        del self.pending[rid]
        rid = self.new_id()  # recompute it later (now, if it fits)
        cached = self.kv.claim(rid, expected)
        self.pending[rid] = expected[cached:]

    @invariant()
    def consistent(self):
        self.kv.check_invariants()
        for rid in self.pending:
            assert_cache_holds(self.kv, rid)

    def teardown(self):
        self.kv.release_all()
        self.kv.check_invariants()
        pool = self.kv.pool
        assert pool.num_referenced == 0 and pool.num_free + pool.num_evictable == pool.num_usable


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
