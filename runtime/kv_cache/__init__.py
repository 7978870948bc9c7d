"""KV cache parameters, managers and memory estimates (the runtime owns the buffers)."""
from ember.graphs.nn.kv_cache import KVCacheParams, KVCacheStrategy

from .block_pool import SCRATCH_PAGE, CachedPage, PagePool, page_hash
from .continuous import ContinuousKVCacheManager, KVCacheExhausted
from .paged import PagedKVCacheManager
from .slot_mirror import SlotMirror

__all__ = ["KVCacheParams", "KVCacheStrategy", "ContinuousKVCacheManager", "KVCacheExhausted",
           "PagedKVCacheManager", "SlotMirror", "PagePool", "CachedPage", "page_hash", "SCRATCH_PAGE"]
