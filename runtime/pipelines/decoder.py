"""The generic decoder ``PipelineModel`` shared by Llama-family architectures (CONTINUOUS KV cache).

A model call processes, for each row, the context's pending tokens: the whole prompt on the first call,
then one sampled token per call. Rows are right-padded to the longest; onnxruntime's attention kernel
runs a batch in one of three modes (all rows new prompts; one new token per row; a single row with
several tokens after a cached prefix), and :func:`batch_mode` says which a batch is so the pipeline can
split any other mix.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import psutil

from ember.graphs.nn.kv_cache import KVCacheParams, KVCacheStrategy
from ember.graphs.nn.transformer import ReturnLogits

from ..kv_cache.continuous import ContinuousKVCacheManager
from ..session import Device, InferenceSession, LoadedModel, ortvalue
from .artifact_cache import ResolvedArtifact, ensure_artifact
from .config import PipelineConfig
from .context import TextContext
from .interfaces import KVCacheMixin, ModelInputs, ModelOutputs, PipelineModel
from .model_source import ModelSource

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 8


@dataclasses.dataclass(kw_only=True)
class DecoderInputs(ModelInputs):
    """``tokens`` [batch, seq] int64 (right-padded), ``input_lengths`` and ``cache_lengths`` [batch] int32."""

    tokens: np.ndarray
    input_lengths: np.ndarray
    cache_lengths: np.ndarray
    request_ids: list[str] = dataclasses.field(default_factory=list)
    kv_start: int = 0
    return_n_logits: int = 1


def batch_mode(input_lengths: np.ndarray, cache_lengths: np.ndarray) -> str | None:
    """``prefill``, ``decode`` or ``extend`` (one row after a prefix); None if the kernel cannot run it."""
    if int(input_lengths.max()) == 1:
        return "decode"
    if not cache_lengths.any():
        return "prefill"
    if len(input_lengths) == 1:
        return "extend"
    return None


class DecoderPipelineModel(PipelineModel, KVCacheMixin):
    """A compiled decoder-only model on onnxruntime with a CONTINUOUS KV cache."""

    def __init__(self, pipeline_config: PipelineConfig, session: InferenceSession, devices: Sequence[Device] = (),
                 kv_cache_config: Any = None, weights: Any = None, adapter: Any = None,
                 return_logits: ReturnLogits | None = None, *, architecture: Any = None,
                 available_cache_memory: int | None = None):
        super().__init__(pipeline_config, session, devices or session.devices, kv_cache_config, weights, adapter,
                         return_logits or pipeline_config.return_logits)
        self.architecture = architecture
        self.resolved: ResolvedArtifact = ensure_artifact(pipeline_config, architecture,
                                                          ModelSource.resolve(pipeline_config.model_path))
        self.artifact = self.resolved.artifact
        self.huggingface_config = self.artifact.hf_config
        self.return_logits = ReturnLogits(self.artifact.manifest["return_logits"])
        self.max_seq_len = upper_bounded_max_len(pipeline_config, self.artifact.manifest)
        self.vocab_size = int(self.artifact.manifest["limits"]["vocab_size"])
        self.model: LoadedModel = self.load_model(session)
        self.kv_manager: ContinuousKVCacheManager = self.load_kv_manager(session, available_cache_memory)
        self._logits = np.zeros((self.kv_manager.max_batch_size, self.vocab_size), dtype=np.float32)
        self._logit_views: dict[int, Any] = {}
        start = time.perf_counter()
        self.warm_up()
        self.warm_up_seconds = time.perf_counter() - start

    # classmethods (MAX's sizing API) ------------------------------------------------------------
    @classmethod
    def get_kv_params(cls, huggingface_config: Any, pipeline_config: PipelineConfig | None = None) -> KVCacheParams:
        heads = huggingface_config.num_attention_heads
        head_dim = getattr(huggingface_config, "head_dim", None) or huggingface_config.hidden_size // heads
        strategy = (pipeline_config.kv_cache_strategy if pipeline_config is not None else None) or \
            KVCacheStrategy.CONTINUOUS
        return KVCacheParams(dtype="float32", n_kv_heads=getattr(huggingface_config, "num_key_value_heads", heads) or heads,
                             head_dim=head_dim, num_layers=cls.get_num_layers(huggingface_config),
                             cache_strategy=KVCacheStrategy(strategy))

    @classmethod
    def estimate_weights_size(cls, pipeline_config: PipelineConfig) -> int:
        """float32 bytes of every weight (the encoding of this build)."""
        from .architectures import PIPELINE_REGISTRY
        hf = PIPELINE_REGISTRY.get_active_huggingface_config(pipeline_config.model_path)
        hidden, inter, vocab = hf.hidden_size, hf.intermediate_size, hf.vocab_size
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hidden // heads
        kv_heads = getattr(hf, "num_key_value_heads", heads) or heads
        per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter + 2 * hidden
        params = hf.num_hidden_layers * per_layer + vocab * hidden * (1 if hf.tie_word_embeddings else 2) + hidden
        return 4 * params

    # loading ------------------------------------------------------------------------------------
    def load_model(self, session: InferenceSession) -> LoadedModel:
        return session.load(self.artifact, verify=False)

    def load_kv_manager(self, session: InferenceSession, available_cache_memory: int | None) -> ContinuousKVCacheManager:
        kv = self.artifact.manifest["kv_params"]
        params = KVCacheParams(dtype=kv["dtype"], n_kv_heads=kv["n_kv_heads"], head_dim=kv["head_dim"],
                               num_layers=kv["num_layers"], page_size=kv.get("page_size", 128))
        if available_cache_memory is None:
            available_cache_memory = psutil.virtual_memory().available // 2
        per_sequence = self.max_seq_len * params.bytes_per_token
        budget = min(available_cache_memory, self.pipeline_config.kv_cache_bytes or available_cache_memory)
        fits = max(1, budget // per_sequence)
        batch = self.pipeline_config.max_batch_size or min(DEFAULT_MAX_BATCH_SIZE, fits)
        if self.pipeline_config.max_batch_size and self.pipeline_config.max_batch_size > fits:
            raise ValueError(f"max_batch_size {batch} needs {batch * per_sequence / 2**30:.2f} GiB of KV cache at "
                             f"max_length {self.max_seq_len}; {budget / 2**30:.2f} GiB are allowed")
        return ContinuousKVCacheManager(params, batch, self.max_seq_len)

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

    # inputs -------------------------------------------------------------------------------------
    def prepare_initial_token_inputs(self, context_batch: Sequence[TextContext], kv_cache_inputs: Any = None,
                                     return_n_logits: int = 1) -> DecoderInputs:
        by_id = {ctx.request_id: ctx for ctx in context_batch}
        for ctx in context_batch:
            if not self.kv_manager.contains(ctx.request_id):
                if ctx.start_idx != 0:
                    raise ValueError(f"request {ctx.request_id} has cached tokens but no KV cache slot")
                self.kv_manager.claim(ctx.request_id)
        start, order = self.kv_manager.arrange([ctx.request_id for ctx in context_batch])
        contexts = [by_id[r] for r in order]
        pending = [ctx.pending_tokens for ctx in contexts]
        width = max(len(p) for p in pending)
        tokens = np.zeros((len(contexts), width), dtype=np.int64)
        for row, p in enumerate(pending):
            tokens[row, :len(p)] = p
        input_lengths = np.array([len(p) for p in pending], dtype=np.int32)
        cache_lengths = np.array([ctx.start_idx for ctx in contexts], dtype=np.int32)
        if batch_mode(input_lengths, cache_lengths) is None:
            raise ValueError("a batch must be all new prompts, one token per row, or a single row; split it")
        return DecoderInputs(tokens=tokens, input_lengths=input_lengths, cache_lengths=cache_lengths,
                             request_ids=order, kv_start=start, return_n_logits=return_n_logits)

    def prepare_next_token_inputs(self, next_tokens: np.ndarray, prev_model_inputs: DecoderInputs) -> DecoderInputs:
        prev = prev_model_inputs
        return DecoderInputs(tokens=np.asarray(next_tokens, dtype=np.int64).reshape(-1, 1),
                             input_lengths=np.ones_like(prev.input_lengths),
                             cache_lengths=(prev.cache_lengths + prev.input_lengths).astype(np.int32),
                             request_ids=prev.request_ids, kv_start=prev.kv_start,
                             return_n_logits=prev.return_n_logits)

    # execution ----------------------------------------------------------------------------------
    def execute(self, model_inputs: DecoderInputs) -> ModelOutputs:
        inputs = model_inputs
        batch = inputs.tokens.shape[0]
        if int((inputs.cache_lengths + inputs.input_lengths).max()) > self.max_seq_len:
            raise ValueError(f"a sequence would pass the maximum length {self.max_seq_len}")
        model = self.model
        model.bind_input("input_ids", inputs.tokens)
        model.bind_input("input_lengths", inputs.input_lengths)
        model.bind_input("cache_lengths", inputs.cache_lengths)
        params = self.kv_manager.params
        for layer, (key, value) in enumerate(self.kv_manager.bindings(inputs.kv_start, batch)):
            past_key, past_value = params.input_names(layer)
            present_key, present_value = params.output_names(layer)
            model.bind_buffer(past_key, key)
            model.bind_buffer(past_value, value)
            model.bind_buffer(present_key, key, output=True)
            model.bind_buffer(present_value, value, output=True)
        if self.return_logits is ReturnLogits.LAST_TOKEN:
            if batch not in self._logit_views:
                self._logit_views[batch] = ortvalue(self._logits[:batch])
            model.bind_buffer("logits", self._logit_views[batch], output=True)
            model.run()
            logits = self._logits[:batch].copy()
            outputs = ModelOutputs(next_token_logits=logits)
        else:
            model.bind_output_to_host("logits")
            model.run()
            all_logits = model.output("logits").numpy()
            rows = np.arange(batch)
            outputs = ModelOutputs(next_token_logits=all_logits[rows, inputs.input_lengths - 1].copy(),
                                   logits=all_logits)
        for request_id, n in zip(inputs.request_ids, inputs.input_lengths):
            self.kv_manager.step(request_id, int(n))
        return outputs

    def release(self, request_id: str) -> None:
        if self.kv_manager.contains(request_id):
            self.kv_manager.release(request_id)


def upper_bounded_max_len(pipeline_config: PipelineConfig, manifest: dict) -> int:
    from .config import upper_bounded_default
    return upper_bounded_default(manifest["limits"]["max_position_embeddings"], pipeline_config.max_length)
