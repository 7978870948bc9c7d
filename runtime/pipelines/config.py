"""Pipeline configuration: what to run, how, and within which limits (``max.pipelines.PipelineConfig``)."""
from __future__ import annotations

import enum
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from ember.graphs.nn.kv_cache import DEFAULT_PAGE_SIZE, KVCacheStrategy
from ember.graphs.nn.transformer import ReturnLogits


class SupportedEncoding(str, enum.Enum):
    """Weight encodings. ``q8_0`` / ``q4_0``: 8- / 4-bit blocks of 32, from any weights (round to nearest,
    or a GGUF's own blocks of that type); ``q4_1`` / ``q4_k``: a GGUF's own blocks of that type, kept;
    ``w8a8``: int8 weights (one scale per output channel) times activations quantized to 8 bits at run
    time, for compute-bound encoders."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    q8_0 = "q8_0"
    q4_0 = "q4_0"
    q4_1 = "q4_1"
    q4_k = "q4_k"
    gptq = "gptq"
    w8a8 = "w8a8"


#: Encodings that keep a checkpoint's own GGML blocks: they apply only where the checkpoint has them.
BLOCK_ENCODINGS = {SupportedEncoding.q4_1: "Q4_1", SupportedEncoding.q4_k: "Q4_K"}
#: A GGUF's dominant block type -> the encoding that runs it as it is (its default encoding).
NATIVE_ENCODINGS = {"Q4_0": SupportedEncoding.q4_0, "Q4_1": SupportedEncoding.q4_1,
                    "Q8_0": SupportedEncoding.q8_0, "Q4_K": SupportedEncoding.q4_k}


class WeightsFormat(str, enum.Enum):
    safetensors = "safetensors"
    gguf = "gguf"


def upper_bounded_default(upper_bound: int, default: int | None) -> int:
    """``default``, or ``upper_bound`` when it is None; a ``ValueError`` when ``default`` exceeds the bound."""
    if default is None:
        return upper_bound
    if default > upper_bound:
        raise ValueError(f"value {default} is larger than the upper bound {upper_bound} (the model's maximum)")
    return default


def slots_verified_on_this_cpu() -> bool:
    """Whether this machine's CPU is one the slots' switched model is verified on (x86-64: every CPU ember's tests
    and benchmarks ran on). On Arm, onnxruntime 1.28 crashed creating a session whose If branches hold
    MatMulNBits at accuracy level 4 over the outer graph's weights (onnxruntime issue #31137, closed; unverified
    here): automatic slots stay off there, asked-for ones are the user's call."""
    return platform.machine().lower() in ("x86_64", "amd64")


def default_cache_dir() -> Path:
    return Path(os.environ.get("EMBER_CACHE") or Path.home() / ".cache" / "ember")


@dataclass
class PipelineConfig:
    """One model served by one pipeline. ``model_path`` is an HF model directory, a GGUF file or an artifact."""

    model_path: str | Path | None = None
    max_length: int | None = None
    max_batch_size: int | None = None
    encoding: SupportedEncoding | str | None = None
    kv_cache_strategy: KVCacheStrategy | str | None = None
    target: str = "ort-cpu"
    # Where the model runs: "cpu", "cuda" or "cuda:N"; None: device 0 of the kind the target compiles for.
    device: str | None = None
    cache_dir: Path | str | None = None
    num_threads: int | None = None
    return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN
    kv_cache_bytes: int | None = None
    # PAGED: at most this many pages (besides the byte cap), and whether full pages are shared by prefix.
    kv_cache_pages: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_page_size: int = DEFAULT_PAGE_SIZE
    # 0: float KV cache; 8: int8 with scales calibrated at compile time (ort-cpu, continuous strategy).
    kv_cache_bit_width: int = 0
    force_compile: bool = False
    # Embeddings: pool (and normalize, as the model's sentence-transformers config says) inside the graph,
    # and truncate inputs longer than the model's maximum (False: reject them).
    pool_embeddings: bool = True
    truncation: bool = True
    # Speculative decoding (runtime/speculative/): "ngram" (prompt lookup) or "draft" (``draft_model_path``, a
    # decoder sharing the tokenizer); up to ``num_speculative_tokens`` drafts per step, fewer when acceptance is
    # low (``speculative_adaptive``). Needs the paged KV cache; the artifact returns every position's logits.
    speculative: str | None = None
    num_speculative_tokens: int = 4
    draft_model_path: str | Path | None = None
    speculative_adaptive: bool = True
    # Tensor parallelism (runtime/distributed/): the decoder split over this many ranks, each a process on this
    # machine (or started by torchrun across hosts), joined by torch.distributed.
    tensor_parallel: int = 1
    # PAGED on a CPU: decode up to this many sequences on the continuous graph over slots mirrored from their pages
    # (runtime/kv_cache/slot_mirror.py) while only they are decoding. The artifact then holds both graphs behind a
    # switch (one session, the weights once: compiler/slot_graph.py); a slot costs max_length tokens of KV cache
    # per sequence. 0: off. None (the default): 1 where they can serve (decode_slots_possible, then the target),
    # else 0, with decode_slots_auto set (an artifact compiled without the slots' graph is then served without
    # them, not refused).
    decode_slots: int | None = None
    decode_slots_auto: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.encoding is not None:
            try:
                self.encoding = SupportedEncoding(self.encoding)
            except ValueError:
                raise ValueError(f"unknown encoding {self.encoding!r}; known: "
                                 f"{', '.join(e.value for e in SupportedEncoding)}") from None
        if self.kv_cache_strategy is not None:
            self.kv_cache_strategy = KVCacheStrategy(self.kv_cache_strategy)
        self.return_logits = ReturnLogits(self.return_logits)
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        if self.device is not None:
            from ..session import parse_device

            parse_device(self.device)  # a bad device fails here, before anything is compiled
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}")
        if not isinstance(self.kv_cache_bit_width, int) or self.kv_cache_bit_width < 0:  # the target names its own
            raise ValueError(f"kv_cache_bit_width must be 0 (float) or a bit width; got {self.kv_cache_bit_width!r}")
        if self.kv_cache_pages is not None and self.kv_cache_pages < 1:
            raise ValueError(f"kv_cache_pages must be positive, got {self.kv_cache_pages}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be positive, got {self.max_batch_size}")
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be a positive number of ranks, got {self.tensor_parallel!r}")
        self._check_speculative()
        self._check_decode_slots()

    def _check_decode_slots(self) -> None:
        """Decode slots mirror a paged cache's float pages, for plain decoding on one process."""
        if self.decode_slots is None:
            self.decode_slots, self.decode_slots_auto = int(self.decode_slots_possible()), True
            return
        if not isinstance(self.decode_slots, int) or self.decode_slots < 0:
            raise ValueError(f"decode_slots must be a number of slots >= 0, got {self.decode_slots!r}")
        if not self.decode_slots:
            return
        for clash, why in ((self.kv_cache_strategy is KVCacheStrategy.CONTINUOUS, "the paged KV cache"),
                           (self.speculative is not None, "plain decoding (a verification step runs the paged graph, "
                                                          "whose last bits its plain steps must share)"),
                           (self.kv_cache_bit_width != 0, "a float KV cache"),
                           (self.tensor_parallel != 1, "one process (tensor_parallel 1)")):
            if clash:
                raise ValueError(f"decode_slots mirror pages for {why}")
        self.kv_cache_strategy = KVCacheStrategy.PAGED

    def decode_slots_possible(self) -> bool:
        """Whether decode slots can serve this configuration as far as it says: a paged float KV cache on the CPU,
        plain decoding, one process (what ``decode_slots=None`` turns them on for; the compile then keeps them only
        where the target runs them, ``CompileOptions.slot_graph_refusal``)."""
        return (self.kv_cache_strategy is KVCacheStrategy.PAGED and self.speculative is None
                and self.kv_cache_bit_width == 0 and self.tensor_parallel == 1
                and (self.device is None or self.device.startswith("cpu")) and slots_verified_on_this_cpu())

    def _check_speculative(self) -> None:
        """Resolve the speculative options once: a draft model implies ``draft``; the paged cache and every
        position's logits are what a verification step needs (the continuous cache cannot drop rejected K/V)."""
        if self.draft_model_path is not None and self.speculative is None:
            self.speculative = "draft"
        if self.speculative is None:
            return
        if self.speculative not in ("ngram", "draft"):
            raise ValueError(f"speculative must be 'ngram' or 'draft', got {self.speculative!r}")
        if self.speculative == "draft" and self.draft_model_path is None:
            raise ValueError("speculative='draft' needs draft_model_path (--draft-model)")
        if self.speculative == "ngram" and self.draft_model_path is not None:
            raise ValueError("draft_model_path is for speculative='draft', not 'ngram'")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {self.num_speculative_tokens!r}")
        if self.kv_cache_strategy is KVCacheStrategy.CONTINUOUS:
            raise ValueError("speculative decoding needs kv_cache_strategy='paged' (the continuous cache cannot "
                             "release rejected draft tokens)")
        self.kv_cache_strategy = KVCacheStrategy.PAGED
        self.return_logits = ReturnLogits.ALL  # a verification row needs logits at each draft position
