"""The sentence-transformers peer for ``ember bench --compare st``: the same weights in PyTorch.

torch and sentence-transformers are imported here only, and this module only when asked for:
deployments of ember have no torch.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .bench_hf import weights_source

logger = logging.getLogger(__name__)


class STRunner:
    """``SentenceTransformer(model_dir, device="cpu")`` in float32, with ember's thread count."""

    name = "st"

    def __init__(self, model: str | Path, num_threads: int):
        try:
            import sentence_transformers
            import torch
            import transformers
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            raise ValueError(f"--compare st needs torch and sentence-transformers ({error})") from None
        self.torch = torch
        torch.set_num_threads(num_threads)
        source = weights_source(model, peer="st")
        if source.kind != "hf":
            raise ValueError(f"--compare st needs a Hugging Face model directory; {source.path} is a {source.kind} file")
        transformers.utils.logging.disable_progress_bar()  # its weight-loading bar; the CLI says what loads
        self.model = SentenceTransformer(str(source.path), device="cpu").eval()
        self.info = {"source": str(source.path), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "sentence_transformers": sentence_transformers.__version__, "dtype": "float32",
                     "max_seq_length": self.model.max_seq_length}
        logger.info("loaded %s in sentence-transformers with %d threads", source.path, torch.get_num_threads())

    def encode(self, sentences: list[str], batch_size: int) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model.encode(sentences, batch_size=batch_size, show_progress_bar=False,
                                     convert_to_numpy=True)
