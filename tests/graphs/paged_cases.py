"""Random ``ember.PagedAttention`` inputs and the contiguous (``ember.CachedAttention``) inputs they stand for.

Page 0 is the scratch page (padding page-table entries and padding tokens' slots point there); the other
pages go to the rows in order, or shuffled (non-contiguous and in a different order per row). Spare pages
that no row owns hold NaN, so that reading them anywhere shows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ember.graphs.ir.custom.paged_attention import pool_rows


@dataclass
class PagedCase:
    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    cache_lengths: np.ndarray
    input_lengths: np.ndarray
    cos: np.ndarray | None
    sin: np.ndarray | None
    key_cache: np.ndarray  # [pool_rows, kv, hd]
    value_cache: np.ndarray
    page_table: np.ndarray  # int32 [batch, pages]
    slot_mapping: np.ndarray  # int64 [batch, seq]
    rows: np.ndarray  # [batch, pages * page_size]: pool row of each position
    spare_pages: list[int]
    page_size: int

    @property
    def past_key(self) -> np.ndarray:
        """The contiguous cache ``[batch, kv, max_len, hd]`` that the pool and page table describe."""
        return self.key_cache[self.rows].transpose(0, 2, 1, 3)

    @property
    def past_value(self) -> np.ndarray:
        return self.value_cache[self.rows].transpose(0, 2, 1, 3)


def rotary_tables(max_positions: int, rotary_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    angles = np.arange(max_positions)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def make_case(rng: np.random.Generator, cache_lengths, input_lengths, *, heads: int = 4, kv_heads: int = 2,
              head_dim: int = 8, page_size: int = 4, shuffle: bool = True, rotary_dim: int | None = None,
              max_positions: int = 64, spare_pages: int = 3) -> PagedCase:
    cache_lengths = np.array(cache_lengths, np.int32)
    input_lengths = np.array(input_lengths, np.int32)
    batch, seq = len(cache_lengths), int(input_lengths.max())
    totals = cache_lengths + input_lengths
    needed = [-(-int(t) // page_size) for t in totals]
    pages = max(needed) + 1  # one more column than the longest row needs: padding entries (page 0) everywhere
    num_pages = 1 + sum(needed) + spare_pages
    ids = np.arange(1, num_pages)
    if shuffle:
        ids = rng.permutation(ids)
    page_table = np.zeros((batch, pages), np.int32)
    start = 0
    for b, n in enumerate(needed):
        page_table[b, :n] = ids[start:start + n]
        start += n
    spare = sorted(int(i) for i in ids[start:])
    shape = (num_pages * page_size, kv_heads, head_dim)
    key_cache = rng.standard_normal(shape).astype(np.float32)
    value_cache = rng.standard_normal(shape).astype(np.float32)
    for page in spare:
        key_cache[page * page_size:(page + 1) * page_size] = np.nan
        value_cache[page * page_size:(page + 1) * page_size] = np.nan
    positions = np.arange(pages * page_size)
    rows = np.stack([pool_rows(page_table[b], positions, page_size) for b in range(batch)])
    slot_mapping = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        c, n = int(cache_lengths[b]), int(input_lengths[b])
        slot_mapping[b, :n] = rows[b, c:c + n]
        slot_mapping[b, n:] = np.arange(n, seq) % page_size  # padding: into the scratch page
    cos = sin = None
    if rotary_dim:
        cos, sin = rotary_tables(max_positions, rotary_dim)
    return PagedCase(
        query=rng.standard_normal((batch, seq, heads * head_dim)).astype(np.float32),
        key=rng.standard_normal((batch, seq, kv_heads * head_dim)).astype(np.float32),
        value=rng.standard_normal((batch, seq, kv_heads * head_dim)).astype(np.float32),
        cache_lengths=cache_lengths, input_lengths=input_lengths, cos=cos, sin=sin, key_cache=key_cache,
        value_cache=value_cache, page_table=page_table, slot_mapping=slot_mapping, rows=rows, spare_pages=spare,
        page_size=page_size)
