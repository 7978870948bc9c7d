"""What the graph needs to know about the KV cache: its layout, not its memory (the runtime owns that)."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy: a GPU target's KV cache dtype)
import numpy as np

#: Tokens per page of a PAGED cache, everywhere a default is needed (graph, compiler, pipeline config): the
#: granularity of allocation and of prefix sharing.
DEFAULT_PAGE_SIZE = 16


class KVCacheStrategy(str, enum.Enum):
    """How K/V are stored (DESIGN.md: the KV cache)."""

    CONTINUOUS = "continuous"  # one contiguous [slots, kv_heads, max_len, head_dim] buffer per layer and K/V
    PAGED = "paged"  # a pool of fixed-size pages per layer and K/V, with page tables


@dataclass(frozen=True)
class KVCacheParams:
    """Shape and type of one model's KV cache."""

    dtype: str
    n_kv_heads: int
    head_dim: int
    num_layers: int
    cache_strategy: KVCacheStrategy = KVCacheStrategy.CONTINUOUS
    page_size: int = DEFAULT_PAGE_SIZE  # tokens per page (PAGED only)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token's K and V take over all layers."""
        return 2 * self.num_layers * self.n_kv_heads * self.head_dim * np.dtype(self.dtype).itemsize

    def input_names(self, layer: int) -> tuple[str, str]:
        """The graph inputs of one layer's cache (a slot per row, or a page pool)."""
        if self.cache_strategy is KVCacheStrategy.PAGED:
            return f"key_cache.{layer}", f"value_cache.{layer}"
        return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"

    def output_names(self, layer: int) -> tuple[str, str]:
        """The graph outputs that the runtime binds to the same buffers as :meth:`input_names`."""
        if self.cache_strategy is KVCacheStrategy.PAGED:
            return f"key_cache_out.{layer}", f"value_cache_out.{layer}"
        return f"present.{layer}.key", f"present.{layer}.value"
