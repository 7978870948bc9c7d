"""The embeddings ``PipelineModel`` for BERT-family encoders (``max.pipelines.architectures.bert``).

One model call embeds a batch: inputs are padded to the batch's longest (not to the model maximum),
the compiled graph runs the encoder and, with ``pool_embeddings``, the pooling and normalization the
model's sentence-transformers configuration asks for, so one run returns the final vectors.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from types import SimpleNamespace
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..session import Device, InferenceSession, LoadedModel
from .config import PipelineConfig, upper_bounded_default
from .interfaces import ModelInputs, ModelOutputs, PipelineModel
from .model_source import ModelSource
from .pooling_config import PoolingConfig

if TYPE_CHECKING:
    from .supported_architecture import ResolvedModel

logger = logging.getLogger(__name__)



@dataclasses.dataclass(kw_only=True)
class BertInputs(ModelInputs):
    """``next_tokens_batch`` [batch, seq] int64 (right-padded) and its ``attention_mask`` (1 token, 0 pad)."""

    next_tokens_batch: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None = None


@dataclasses.dataclass
class BertModelConfig:
    """What the encoder is compiled and run with."""

    dtype: str
    device: Device
    pool_embeddings: bool
    huggingface_config: Any
    pipeline_config: PipelineConfig
    pooling: PoolingConfig = dataclasses.field(default_factory=PoolingConfig)

    @classmethod
    def initialize(cls, pipeline_config: PipelineConfig, huggingface_config: Any = None) -> "BertModelConfig":
        source = ModelSource.resolve(pipeline_config.model_path)
        if huggingface_config is None:
            huggingface_config = source.hf_config()
        pooling = PoolingConfig.from_model_dir(source.path) if source.kind == "hf" else PoolingConfig()
        return cls("float32", Device(), pipeline_config.pool_embeddings, huggingface_config, pipeline_config, pooling)

    def get_max_seq_len(self) -> int:
        """The longest input: the model's positions, sentence-transformers' ``max_seq_length``, max_length."""
        hf = self.huggingface_config
        hf = SimpleNamespace(**hf) if isinstance(hf, dict) else hf  # an artifact's config.json, as plain data
        spec, config = BertPipelineModel.architecture_spec(hf)
        limit = spec.max_positions(config)
        if self.pooling.max_seq_length:
            limit = min(limit, self.pooling.max_seq_length)
        return upper_bounded_default(limit, self.pipeline_config.max_length)


class BertPipelineModel(PipelineModel[BertInputs]):
    """A compiled encoder on onnxruntime that returns embeddings (or last hidden states)."""

    def __init__(self, pipeline_config: PipelineConfig, session: InferenceSession, devices: Sequence[Device] = (),
                 kv_cache_config: Any = None, weights: Any = None, adapter: Any = None, return_logits: Any = None,
                 *, resolved: ResolvedModel, available_cache_memory: int | None = None):
        super().__init__(pipeline_config, session, devices or session.devices, kv_cache_config, weights, adapter)
        self.resolved = resolved  # source, architecture and verified artifact, resolved once by the registry
        self.architecture = resolved.architecture
        self.artifact = resolved.artifact
        # The artifact's config.json as plain data: building a transformers config would import torch.
        self.huggingface_config = resolved.huggingface_config
        pooling = self.artifact.manifest.get("pooling")
        self.config = BertModelConfig("float32", self.devices[0], pooling is not None, self.huggingface_config,
                                      pipeline_config, PoolingConfig(**pooling) if pooling else PoolingConfig())
        # The manifest's limit already folds in sentence-transformers' max_seq_length.
        self.max_seq_len = upper_bounded_default(self.artifact.manifest["limits"]["max_position_embeddings"],
                                                 pipeline_config.max_length)
        self.model: LoadedModel = self.load_model(session)
        self.output_name = "embeddings" if self.config.pool_embeddings else "last_hidden_state"
        start = time.perf_counter()
        self.execute(self._batch([[0, 1]]))
        self.warm_up_seconds = time.perf_counter() - start

    # sizing -------------------------------------------------------------------------------------
    @classmethod
    def calculate_max_seq_len(cls, pipeline_config: PipelineConfig, huggingface_config: Any) -> int:
        config = BertModelConfig("float32", Device(), pipeline_config.pool_embeddings, huggingface_config,
                                 pipeline_config)
        source = ModelSource.resolve(pipeline_config.model_path)
        if source.kind == "hf":
            config.pooling = PoolingConfig.from_model_dir(source.path)
        return config.get_max_seq_len()

    @classmethod
    def get_kv_params(cls, huggingface_config: Any, pipeline_config: PipelineConfig | None = None) -> None:
        """Encoders keep no KV cache."""
        return None

    @classmethod
    def graph_options(cls, pipeline_config: PipelineConfig, source: Any) -> dict[str, Any]:
        if not pipeline_config.pool_embeddings:
            return {"pooling": None, "normalize": False}
        pooling = PoolingConfig.from_model_dir(source.path) if source.kind == "hf" else PoolingConfig()
        return {"pooling": pooling.mode, "normalize": pooling.normalize}

    # running ------------------------------------------------------------------------------------
    def load_model(self, session: InferenceSession) -> LoadedModel:
        return session.load(self.artifact, verify=False)

    def _batch(self, token_lists: Sequence[Sequence[int]]) -> BertInputs:
        width = max(len(t) for t in token_lists)
        tokens = np.zeros((len(token_lists), width), dtype=np.int64)
        mask = np.zeros((len(token_lists), width), dtype=np.int64)
        pad = self.huggingface_config.get("pad_token_id") or 0
        tokens[:] = pad
        for row, ids in enumerate(token_lists):
            tokens[row, :len(ids)] = ids
            mask[row, :len(ids)] = 1
        return BertInputs(next_tokens_batch=tokens, attention_mask=mask, token_type_ids=np.zeros_like(tokens))

    def prepare_initial_token_inputs(self, context_batch: Sequence[Any], kv_cache_inputs: Any = None,
                                     return_n_logits: int = 1) -> BertInputs:
        """Pad the contexts' tokens to the longest in the batch."""
        token_lists = [getattr(c, "tokens", c) for c in context_batch]
        for ids in token_lists:
            if len(ids) > self.max_seq_len:
                raise ValueError(f"an input has {len(ids)} tokens; the model's maximum is {self.max_seq_len}")
        return self._batch(token_lists)

    def prepare_next_token_inputs(self, next_tokens: np.ndarray, prev_model_inputs: BertInputs) -> BertInputs:
        raise ValueError("an encoder computes embeddings in one step; there is no next token")

    def execute(self, model_inputs: BertInputs) -> ModelOutputs:
        feeds = {"input_ids": model_inputs.next_tokens_batch, "attention_mask": model_inputs.attention_mask,
                 "token_type_ids": model_inputs.token_type_ids if model_inputs.token_type_ids is not None
                 else np.zeros_like(model_inputs.next_tokens_batch)}
        feeds = {k: v for k, v in feeds.items() if k in self.model.input_names}
        (output,) = self.model.run_host([self.output_name], feeds)
        return ModelOutputs(logits=output)
