"""What a graph builder is asked to build besides the checkpoint: typed, filled by the compiler.

The compiler's ``CompileOptions`` holds more (target, encoding, KV cache bit width); an architecture's builder
sees only these fields, so it never reads the compiler's names with ``getattr``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .nn.kv_cache import DEFAULT_PAGE_SIZE, KVCacheStrategy
from .nn.transformer import ReturnLogits


@dataclass(frozen=True)
class GraphOptions:
    """``return_logits``: last token or every position; ``kv_cache_strategy`` / ``kv_cache_page_size``: the
    decoder's KV cache form (tokens per page, PAGED only); ``pooling`` ("mean", "cls", "max", "lasttoken"; None:
    the last hidden state) and ``normalize``: an encoder's pooling inside the graph; ``tensor_parallel``: the ranks a
    decoder is split over and ``rank``, the one whose graph to build (``graphs/nn/distributed/``);
    ``use_subgraphs``: identical blocks as one ONNX function called per layer."""

    return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN
    kv_cache_strategy: KVCacheStrategy = KVCacheStrategy.CONTINUOUS
    kv_cache_page_size: int = DEFAULT_PAGE_SIZE
    pooling: str | None = None
    normalize: bool = False
    tensor_parallel: int = 1
    rank: int = 0
    use_subgraphs: bool = False

    def __post_init__(self) -> None:
        if self.kv_cache_page_size < 1:
            raise ValueError(f"kv_cache_page_size must be a positive number of tokens, not {self.kv_cache_page_size}")
        if self.tensor_parallel < 1 or not 0 <= self.rank < self.tensor_parallel:
            raise ValueError(f"rank {self.rank} of tensor_parallel {self.tensor_parallel}: need 0 <= rank < "
                             f"tensor_parallel")
