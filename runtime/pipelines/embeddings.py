"""EmbeddingsPipeline: texts in, one vector per text out (``max.pipelines.EmbeddingsPipeline``'s role).

Texts are tokenized with the model's tokenizer, truncated at the model's maximum (or rejected with a
clear error when truncation is off), sorted by length and cut into batches so that each batch pads only
to its own longest input, then returned in the caller's order.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .bert import BertPipelineModel
from .config import PipelineConfig
from .interfaces import ModelOutputs


@dataclass(eq=False)
class EmbeddingsContext:
    """One text to embed, as tokens."""

    tokens: list[int]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class EmbeddingsResponse:
    embeddings: np.ndarray


class EmbeddingsPipeline:
    """Embeds batches of texts with an encoder ``PipelineModel``."""

    def __init__(self, pipeline_config: PipelineConfig, pipeline_model: BertPipelineModel,
                 eos_token_id: Any = None, tokenizer: Any = None):
        self.pipeline_config = pipeline_config
        self.pipeline_model = pipeline_model
        self.tokenizer = tokenizer

    @property
    def max_length(self) -> int:
        return self.pipeline_model.max_seq_len

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text: truncated at the maximum, or a ValueError naming the text when truncation is off."""
        if self.pipeline_config.truncation:
            return self.tokenizer.encode_batch(list(texts), max_length=self.max_length)
        token_lists = self.tokenizer.encode_batch(list(texts))
        for i, ids in enumerate(token_lists):
            if len(ids) > self.max_length:
                raise ValueError(f"input {i} has {len(ids)} tokens, more than the model's maximum of "
                                 f"{self.max_length} (truncation is off)")
        return token_lists

    def next_token(self, batch: dict[str, EmbeddingsContext], num_steps: int = 1) -> dict[str, EmbeddingsResponse]:
        """MAX's step API: embed every context in ``batch`` in one model call."""
        contexts = list(batch.values())
        vectors = _vectors(self.pipeline_model.execute(self.pipeline_model.prepare_initial_token_inputs(contexts)))
        return {c.request_id: EmbeddingsResponse(vectors[i]) for i, c in enumerate(contexts)}

    def encode(self, texts: Iterable[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """``[len(texts), dim]`` embeddings, in the order given."""
        texts = list(texts)
        if not texts:
            raise ValueError("nothing to embed")
        token_lists = self.tokenize(texts)
        order = np.argsort([len(t) for t in token_lists], kind="stable")
        results: list[np.ndarray] = [np.empty(0)] * len(texts)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress):
            rows = order[start:start + batch_size]
            inputs = self.pipeline_model.prepare_initial_token_inputs([token_lists[i] for i in rows])
            vectors = _vectors(self.pipeline_model.execute(inputs))
            for row, vector in zip(rows, vectors):
                results[row] = vector
        return np.stack(results)


def _vectors(outputs: ModelOutputs) -> np.ndarray:
    """An encoder's call gives its rows' vectors (pooled, or the last hidden state) as ``logits``."""
    if outputs.logits is None:
        raise ValueError("the encoder's call gave no vectors")
    return outputs.logits
