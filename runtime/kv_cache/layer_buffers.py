"""Per layer, one key and one value buffer from the runtime backend: what both KV cache managers hold."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ember.graphs.nn.kv_cache import KVCacheParams

from ..backends import Buffer, RuntimeBackend


class LayerBuffers:
    """``key_buffers`` / ``value_buffers``: a ``shape`` buffer of ``params.dtype`` per layer, allocated by the
    backend (the managers never allocate themselves), and their host views for inspection and tests."""

    def __init__(self, params: KVCacheParams, shape: Sequence[int], backend: RuntimeBackend):
        self.backend = backend
        self.key_buffers: list[Buffer] = [backend.allocate(shape, params.dtype) for _ in range(params.num_layers)]
        self.value_buffers: list[Buffer] = [backend.allocate(shape, params.dtype) for _ in range(params.num_layers)]

    @property
    def keys(self) -> list[np.ndarray]:
        """Per layer, the key buffer on the host (the buffer itself on the CPU backend)."""
        return [self.backend.to_host(b) for b in self.key_buffers]

    @property
    def values(self) -> list[np.ndarray]:
        return [self.backend.to_host(b) for b in self.value_buffers]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.key_buffers, self.value_buffers))

    @property
    def all_buffers(self) -> list[Buffer]:
        return [*self.key_buffers, *self.value_buffers]
