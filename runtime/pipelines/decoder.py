"""The generic decoder ``PipelineModel`` shared by Llama-family architectures (CONTINUOUS or PAGED KV cache).

A model call processes, for each row, some of the context's pending tokens: the whole prompt (or a chunk
of it) first, then one sampled token per call. Rows are right-padded to the longest. How the KV cache is
claimed, which rows can share a call and what is bound besides the tokens depends on the KV strategy
(:mod:`.kv_binding`). ``admit`` / ``reserve`` / ``execute_rows`` are what the scheduler drives;
``prepare_initial_token_inputs`` / ``prepare_next_token_inputs`` / ``execute`` are MAX's step API.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ember.graphs.nn.kv_cache import KVCacheParams, KVCacheStrategy
from ember.graphs.nn.transformer import ReturnLogits

from ..kv_cache.continuous import ContinuousKVCacheManager
from ..kv_cache.paged import PagedKVCacheManager
from ..session import Device, InferenceSession, LoadedModel
from .config import PipelineConfig
from .context import TextContext
from .interfaces import KVCacheMixin, ModelOutputs, PipelineModel
from .decode_slots import DecodeSlots, bind_paged_branch
from .decoder_inputs import DecoderInputs
from .kv_binding import ContinuousBinding, PagedBinding

if TYPE_CHECKING:
    from .supported_architecture import ResolvedModel

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 8  # CONTINUOUS: each slot reserves max_length tokens
DEFAULT_MAX_PAGED_BATCH_SIZE = 32  # PAGED: requests cost only the pages they fill


class DecoderPipelineModel(PipelineModel[DecoderInputs], KVCacheMixin):
    """A compiled decoder-only model on its runtime backend, with a CONTINUOUS or PAGED KV cache."""

    def __init__(self, pipeline_config: PipelineConfig, session: InferenceSession, devices: Sequence[Device] = (),
                 kv_cache_config: Any = None, weights: Any = None, adapter: Any = None,
                 return_logits: ReturnLogits | None = None, *, resolved: ResolvedModel,
                 available_cache_memory: int | None = None, loaded: LoadedModel | None = None):
        super().__init__(pipeline_config, session, devices or session.devices, kv_cache_config, weights, adapter,
                         return_logits or pipeline_config.return_logits)
        self.resolved = resolved  # source, architecture and verified artifact, resolved once by the registry
        self.release_listeners: list[Callable[[str], None]] = []  # told of every release (speculative drafters)
        self.architecture = resolved.architecture
        self.artifact = resolved.artifact
        self.huggingface_config = resolved.huggingface_config
        self.return_logits = ReturnLogits(self.artifact.manifest["return_logits"])
        self.max_seq_len = upper_bounded_max_len(pipeline_config, self.artifact.manifest)
        self.vocab_size = int(self.artifact.manifest["limits"]["vocab_size"])
        # ``loaded``: the model already loaded (the decode slots' binding of a paged model: :func:`slot_branch`)
        self.model: LoadedModel = loaded if loaded is not None else self.load_model(session)
        self._fit_engine_lengths(self.model.shape_limits)
        self.kv_manager = self.load_kv_manager(session, available_cache_memory)
        self.kv = (PagedBinding(self.kv_manager, self._paged_batch, page_major=self._page_major_pools())
                   if isinstance(self.kv_manager, PagedKVCacheManager) else ContinuousBinding(self.kv_manager))
        # Next-token logits: one buffer from the backend, bound by address for each batch size (a view of its
        # first rows), read back to the host after each call.
        self._logits = self.model.backend.allocate((self.kv.max_batch_size, self.vocab_size), np.float32)
        self._logit_views: dict[int, Any] = {}
        self.decode_slots: DecodeSlots | None = None  # attach_decode_slots
        start = time.perf_counter()
        self.warm_up()
        self.warm_up_seconds = time.perf_counter() - start

    # classmethods (MAX's sizing API) ------------------------------------------------------------
    @classmethod
    def get_kv_params(cls, huggingface_config: Any, pipeline_config: PipelineConfig | None = None) -> KVCacheParams:
        """The KV cache's shape, from the architecture's spec; strategy, page size and bit width from the config."""
        spec, config = cls.architecture_spec(huggingface_config)
        pipeline_config = pipeline_config or PipelineConfig(model_path=None)
        strategy = KVCacheStrategy(pipeline_config.kv_cache_strategy or KVCacheStrategy.CONTINUOUS)
        dtype = "int8" if pipeline_config.kv_cache_bit_width == 8 else "float32"
        params = spec.kv_params(config, strategy, dtype, pipeline_config.kv_cache_page_size)
        if params is None:
            raise ValueError(f"{spec.name} keeps no KV cache: it is not a decoder")
        return params

    # loading ------------------------------------------------------------------------------------
    def load_model(self, session: InferenceSession) -> LoadedModel:
        model = session.load(self.artifact, verify=False)
        if "slot_graph" in self.artifact.manifest:  # the paged graph of the two (see attach_decode_slots)
            bind_paged_branch(model, self.artifact.manifest)
        return model

    def load_kv_manager(self, session: InferenceSession, available_cache_memory: int | None):
        kv = self.artifact.manifest["kv_params"]
        strategy = KVCacheStrategy(self.artifact.manifest.get("kv_cache_strategy", KVCacheStrategy.CONTINUOUS))
        params = KVCacheParams(dtype=kv["dtype"], n_kv_heads=kv["n_kv_heads"], head_dim=kv["head_dim"],
                               num_layers=kv["num_layers"], cache_strategy=strategy,
                               page_size=kv["page_size"])  # what the graph was built with
        first_cache = "key_cache.0" if strategy is KVCacheStrategy.PAGED else params.input_names(0)[0]
        graph_dtype = self.model.input_dtype(first_cache)
        if graph_dtype != np.dtype(params.dtype):  # the buffers must be what the kernel reads and writes
            raise ValueError(f"artifact {self.artifact.path}: the manifest's KV cache dtype {params.dtype} is not "
                             f"the graph's {graph_dtype}; recompile the model")
        if available_cache_memory is None:
            available_cache_memory = self.model.backend.available_memory()
        budget = min(available_cache_memory, self.pipeline_config.kv_cache_bytes or available_cache_memory)
        granule = params.page_size if strategy is KVCacheStrategy.PAGED else 1
        reserved = PagedKVCacheManager.page_bytes(params, params.page_size) if granule > 1 else 0  # scratch page
        self._fit_max_length(max(0, budget - reserved) // (granule * params.bytes_per_token) * granule, budget)
        per_sequence = self.max_seq_len * params.bytes_per_token
        if strategy is KVCacheStrategy.PAGED:
            return self._paged_manager(params, budget, per_sequence)
        fits = max(1, budget // per_sequence)
        batch = self._batch_limit(self.pipeline_config.max_batch_size or min(DEFAULT_MAX_BATCH_SIZE, fits))
        if self.pipeline_config.max_batch_size and self.pipeline_config.max_batch_size > fits:
            raise ValueError(f"max_batch_size {batch} needs {batch * per_sequence / 2**30:.2f} GiB of KV cache at "
                             f"max_length {self.max_seq_len}; {budget / 2**30:.2f} GiB are allowed")
        return ContinuousKVCacheManager(params, batch, self.max_seq_len, backend=self.model.backend)

    def _fit_engine_lengths(self, limits: dict[str, int]) -> None:
        """Follow a loaded model whose shapes were fixed when it was built (a TensorRT engine's profile): the
        continuous cache buffer is exactly its ``max_length``; the paged table holds at most ``pages`` pages."""
        asked = self.pipeline_config.max_length
        engine_length = limits.get("max_length") or limits.get("pages", 0) * int(
            self.artifact.manifest["kv_params"]["page_size"])
        if not engine_length:
            return
        if "max_length" in limits:  # continuous: the buffer is bound whole, so it is exactly the engine's length
            if asked is not None and asked != engine_length:
                raise ValueError(f"the engine of {self.artifact.path} holds sequences of exactly {engine_length} "
                                 f"tokens in its continuous KV cache; pass --max-length {engine_length} or none")
            self.max_seq_len = engine_length
        elif asked is not None and asked > engine_length:
            raise ValueError(f"max_length {asked} is more than the {engine_length} tokens the engine of "
                             f"{self.artifact.path} was built for; rebuild it with a larger --max-length")
        else:
            self.max_seq_len = min(self.max_seq_len, engine_length)

    def _batch_limit(self, batch: int) -> int:
        """``batch`` within what the loaded model runs at once (a TensorRT engine's profile); an explicit
        ``max_batch_size`` above it is an error."""
        limit = self.model.shape_limits.get("batch")
        if limit is None or batch <= limit:
            return batch
        if self.pipeline_config.max_batch_size:
            raise ValueError(f"max_batch_size {batch} is more than the {limit} rows the engine of "
                             f"{self.artifact.path} was built for")
        return limit

    def _fit_max_length(self, tokens_that_fit: int, budget: int) -> None:
        """Lower the maximum length to what the KV cache budget holds for one sequence, and say so; a length the
        user asked for that does not fit is an error (a model's own limit, e.g. a million positions, would
        otherwise reserve tens of GiB for one slot, whatever --kv-cache-bytes says)."""
        if tokens_that_fit >= self.max_seq_len:
            return
        where = f"the KV cache budget of {budget / 2**20:.1f} MiB (--kv-cache-bytes, or half the available memory)"
        if self.pipeline_config.max_length is not None or tokens_that_fit < 2:
            raise ValueError(f"{where} holds {tokens_that_fit} tokens of one sequence, less than max_length "
                             f"{self.max_seq_len}; raise --kv-cache-bytes or lower --max-length")
        logger.warning("max_length capped to %d tokens (the model allows %d): %s holds no more", tokens_that_fit,
                       self.max_seq_len, where)
        self.max_seq_len = tokens_that_fit

    def _paged_manager(self, params: KVCacheParams, budget: int, per_sequence: int) -> PagedKVCacheManager:
        """A page pool for ``max_batch_size`` full-length sequences, within the byte budget and the page cap.

        Pages are taken as tokens arrive, so the pool may be smaller than the batch's worst case: requests
        then queue, or the newest is preempted (runtime/scheduler.py)."""
        config = self.pipeline_config
        batch = self._batch_limit(config.max_batch_size or DEFAULT_MAX_PAGED_BATCH_SIZE)
        page_bytes = PagedKVCacheManager.page_bytes(params, params.page_size)
        wanted = PagedKVCacheManager.required_bytes(params, params.page_size, self.max_seq_len, batch)
        pool_rows = self.model.shape_limits.get("pool_rows")
        if pool_rows is not None:  # an engine's pool is fixed at build time: exactly that many pages
            wanted = pool_rows // params.page_size * page_bytes
            if wanted > budget:
                raise ValueError(f"the engine of {self.artifact.path} binds a pool of {pool_rows // params.page_size}"
                                 f" pages ({wanted / 2**20:.1f} MiB), more than the KV cache budget of "
                                 f"{budget / 2**20:.1f} MiB; raise --kv-cache-bytes or rebuild the engine")
        num_pages = min(wanted, budget) // page_bytes
        if config.kv_cache_pages is not None:
            num_pages = min(num_pages, config.kv_cache_pages + 1)  # + the scratch page
        if (num_pages - 1) * params.page_size < self.max_seq_len:
            raise ValueError(f"a paged KV cache of {num_pages - 1} pages of {params.page_size} tokens "
                             f"({num_pages * page_bytes / 2**20:.1f} MiB) cannot hold one sequence of max_length "
                             f"{self.max_seq_len}; raise --kv-cache-bytes / --kv-cache-pages or lower --max-length")
        self._paged_batch = batch
        return PagedKVCacheManager(params, num_pages, params.page_size, self.max_seq_len,
                                   enable_prefix_caching=config.enable_prefix_caching, backend=self.model.backend)

    def _page_major_pools(self) -> bool:
        """Whether the graph reads its paged pools as ``[pages, page_size, kv, head_dim]`` (onnxruntime's contrib
        PagedAttention on ort-cuda) rather than ember's ``[pages * page_size, kv, head_dim]`` rows."""
        shapes = {v["name"]: v["shape"] for v in self.artifact.manifest.get("graph", {}).get("inputs", [])}
        return len(shapes.get("key_cache.0", ())) == 4

    def warm_up(self) -> None:
        """One short prefill and one decode step on a scratch slot, so that onnxruntime's first-run work
        (arena growth, kernel selection) is not paid by the first request."""
        request_id = "__ember_warm_up__"
        ctx = TextContext([1, 2], max_length=self.max_seq_len, request_id=request_id)
        try:
            inputs = self.prepare_initial_token_inputs([ctx])
            self.execute(inputs)
            ctx.start_idx = ctx.active_idx
            ctx.append(3)
            self.execute(self.prepare_next_token_inputs(np.array([3]), inputs))
        finally:
            self.release(request_id)

    def attach_decode_slots(self, slot_model: DecoderPipelineModel) -> None:
        """Run in ``slot_model`` (the continuous graph of this model's artifact, a slot per sequence it may hold:
        the registry makes it with :func:`~.decode_slots.slot_branch`) the steps that fit its slots; the pages stay
        the truth (:mod:`.decode_slots`)."""
        if not isinstance(self.kv_manager, PagedKVCacheManager):
            raise ValueError("decode slots mirror a paged KV cache; this model's is continuous")
        self.decode_slots = DecodeSlots(self.kv_manager, slot_model, self.vocab_size, self.return_logits)

    # the scheduler's interface (runtime/scheduler.py) --------------------------------------------
    @property
    def max_batch_size(self) -> int:
        return self.kv.max_batch_size

    def admit(self, context: TextContext) -> bool:
        """Give a new (or preempted) request its KV cache (slot, or cached prefix pages); False if no room."""
        return self.kv.admit(context)

    def reserve(self, context: TextContext, num_tokens: int) -> bool:
        """Room for ``num_tokens`` more tokens of an admitted request; False if the cache is full."""
        return self.kv.reserve(context, num_tokens)

    def holds(self, request_id: str) -> bool:
        """Whether the request has KV cache (a slot, or pages)."""
        return self.kv.manager.contains(request_id)

    def claim(self, context: TextContext) -> None:
        """KV cache for a context that skipped admission (MAX's ``next_token``): a slot or its prompt's pages now,
        or ``KVCacheExhausted``; nothing if it has them already."""
        self.kv.ensure_claimed(context)

    def execute_rows(self, rows: Sequence[tuple[TextContext, int]]) -> np.ndarray:
        """Compute ``count`` tokens of each context from its ``start_idx``; next-token logits per row
        (in as many model calls as the KV strategy needs, see :mod:`.kv_binding`)."""
        logits: np.ndarray | None = None
        for _, outputs, order in self._grouped_calls(rows, commit=True):
            assert outputs.next_token_logits is not None  # a decoder's call always gives next-token logits
            if len(order) == len(rows) and order == sorted(order):
                return outputs.next_token_logits  # one call, rows in order (every decode step): no 2nd copy
            if logits is None:
                logits = np.empty((len(rows), self.vocab_size), dtype=np.float32)
            logits[order] = outputs.next_token_logits
        assert logits is not None
        return logits

    def _grouped_calls(self, rows: Sequence[tuple[TextContext, int]],
                       commit: bool) -> Iterator[tuple[DecoderInputs, ModelOutputs, list[int]]]:
        """One model call per group the KV strategy forms (:mod:`.kv_binding`): its inputs, its outputs, and for
        each of its rows (in the call's order) the index of that row in ``rows``."""
        for group in self.kv.groups(rows):
            inputs = self.prepare_rows([rows[i][0] for i in group], [rows[i][1] for i in group])
            index_of = {rows[i][0].request_id: i for i in group}
            yield inputs, self.execute(inputs, commit=commit), [index_of[r] for r in inputs.request_ids]

    # speculative decoding (runtime/speculative/) --------------------------------------------------
    def execute_rows_uncommitted(self, rows: Sequence[tuple[TextContext, int]],
                                 num_logits: Sequence[int]) -> tuple[list[np.ndarray], list[DecoderInputs]]:
        """Like :meth:`execute_rows`, but each row's logits at its last ``num_logits[i]`` positions
        (``[num_logits[i], vocab]``: a verification row needs one per draft token plus one), and nothing committed:
        the caller passes the returned inputs to :meth:`commit_rows` with the tokens to keep. Needs an artifact
        compiled with ``ReturnLogits.ALL``."""
        if self.return_logits is not ReturnLogits.ALL:
            raise ValueError("speculative decoding needs an artifact compiled with return_logits=ALL")
        logits: list[np.ndarray] = [np.empty(0)] * len(rows)
        calls = []
        for inputs, outputs, order in self._grouped_calls(rows, commit=False):
            assert outputs.logits is not None  # return_logits ALL (checked above)
            for row, i in enumerate(order):
                end = int(inputs.input_lengths[row])
                logits[i] = outputs.logits[row, end - num_logits[i]:end]
            calls.append(inputs)
        return logits, calls

    def commit_rows(self, calls: Sequence[DecoderInputs], keep: dict[str, int]) -> None:
        """Commit the first ``keep[request_id]`` tokens of each row of calls run uncommitted; the K/V written for
        the rest (rejected drafts) is left in reserved, unregistered room that the next step overwrites."""
        for inputs in calls:
            counts = np.array([keep[r] for r in inputs.request_ids], dtype=np.int32)
            self.kv.commit(inputs.request_ids, inputs.tokens, counts)
            for request_id, kept, computed in zip(inputs.request_ids, counts, inputs.input_lengths):
                if kept < computed and isinstance(self.kv_manager, PagedKVCacheManager):
                    self.kv_manager.trim(request_id)  # pages that held only rejected drafts go back to the pool

    # inputs -------------------------------------------------------------------------------------
    def prepare_initial_token_inputs(self, context_batch: Sequence[TextContext], kv_cache_inputs: Any = None,
                                     return_n_logits: int = 1) -> DecoderInputs:
        for ctx in context_batch:
            self.kv.ensure_claimed(ctx)
        return self.prepare_rows(context_batch, [len(ctx.pending_tokens) for ctx in context_batch],
                                 return_n_logits)

    def prepare_rows(self, context_batch: Sequence[TextContext], counts: Sequence[int],
                     return_n_logits: int = 1) -> DecoderInputs:
        """Inputs computing ``counts[i]`` tokens of each context from its ``start_idx`` (KV cache claimed)."""
        if not context_batch:
            raise ValueError("a model call needs at least one row")
        by_id = {ctx.request_id: (ctx, n) for ctx, n in zip(context_batch, counts)}
        order, kv_inputs = self.kv.order([ctx.request_id for ctx in context_batch])
        contexts = [by_id[r][0] for r in order]
        pending = [ctx.step_tokens(by_id[ctx.request_id][1]) for ctx in contexts]  # drafts after known tokens
        width = max(len(p) for p in pending)
        tokens = np.zeros((len(contexts), width), dtype=np.int64)
        for row, p in enumerate(pending):
            tokens[row, :len(p)] = p
        input_lengths = np.array([len(p) for p in pending], dtype=np.int32)
        cache_lengths = np.array([ctx.start_idx for ctx in contexts], dtype=np.int32)
        self.kv.check(input_lengths, cache_lengths)
        return DecoderInputs(tokens=tokens, input_lengths=input_lengths, cache_lengths=cache_lengths,
                             request_ids=order, return_n_logits=return_n_logits,
                             kv_cache_inputs=self.kv.step_inputs(order, input_lengths, width, kv_inputs))

    def prepare_next_token_inputs(self, next_tokens: np.ndarray, prev_model_inputs: DecoderInputs) -> DecoderInputs:
        prev = prev_model_inputs
        ones = np.ones_like(prev.input_lengths)
        return DecoderInputs(tokens=np.asarray(next_tokens, dtype=np.int64).reshape(-1, 1),
                             input_lengths=ones,
                             cache_lengths=(prev.cache_lengths + prev.input_lengths).astype(np.int32),
                             request_ids=prev.request_ids,
                             kv_cache_inputs=self.kv.step_inputs(prev.request_ids, ones, 1, prev.kv_cache_inputs),
                             return_n_logits=prev.return_n_logits)

    # execution ----------------------------------------------------------------------------------
    def execute(self, model_inputs: DecoderInputs, commit: bool = True) -> ModelOutputs:
        """Run one call; ``commit=False`` leaves the new tokens' K/V uncommitted (:meth:`commit_rows` then says
        how many of each row to keep: speculative verification keeps only the accepted drafts)."""
        inputs = model_inputs
        batch = inputs.tokens.shape[0]
        if batch == 0:  # never to the kernels: GroupQueryAttention dies (SIGFPE) on a batch of no rows
            raise ValueError("a model call needs at least one row")
        if int((inputs.cache_lengths + inputs.input_lengths).max()) > self.max_seq_len:
            raise ValueError(f"a sequence would pass the maximum length {self.max_seq_len}")
        if self.decode_slots is not None:
            if commit and self.decode_slots.fits(inputs):
                outputs = self.decode_slots.execute(inputs)
                self.kv.commit(inputs.request_ids, inputs.tokens, inputs.input_lengths)
                return outputs
            self.decode_slots.before_paged_step()
        model = self.model
        model.bind_input("input_ids", inputs.tokens)
        model.bind_input("input_lengths", inputs.input_lengths)
        model.bind_input("cache_lengths", inputs.cache_lengths)
        self.kv.bind(model, inputs.request_ids, inputs.kv_cache_inputs)
        if self.return_logits is ReturnLogits.LAST_TOKEN:
            if batch not in self._logit_views:
                self._logit_views[batch] = model.backend.view(self._logits, 0, batch)
            model.bind_buffer("logits", self._logit_views[batch], output=True)
            model.run()
            logits = model.backend.to_host(self._logits, 0, batch).copy()
            outputs = ModelOutputs(next_token_logits=logits)
        else:
            model.bind_output_to_host("logits")
            model.run()
            all_logits = model.output("logits")
            rows = np.arange(batch)
            outputs = ModelOutputs(next_token_logits=all_logits[rows, inputs.input_lengths - 1].copy(),
                                   logits=all_logits)
        if commit:
            self.kv.commit(inputs.request_ids, inputs.tokens, inputs.input_lengths)
            if self.decode_slots is not None:
                self.decode_slots.after_paged_step(inputs.request_ids)
        return outputs

    def release(self, request_id: str) -> None:
        if self.decode_slots is not None:
            self.decode_slots.release(request_id)
        self.kv.release(request_id)
        for listener in self.release_listeners:  # e.g. a draft model's cache for the same request
            listener(request_id)


def upper_bounded_max_len(pipeline_config: PipelineConfig, manifest: dict) -> int:
    from .config import upper_bounded_default
    return upper_bounded_default(manifest["limits"]["max_position_embeddings"], pipeline_config.max_length)
