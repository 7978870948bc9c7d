"""KV cache parameters, managers and memory estimates (the runtime owns the buffers)."""
from ember.graphs.nn.kv_cache import KVCacheParams, KVCacheStrategy

from .continuous import ContinuousKVCacheManager, KVCacheExhausted

__all__ = ["KVCacheParams", "KVCacheStrategy", "ContinuousKVCacheManager", "KVCacheExhausted"]
