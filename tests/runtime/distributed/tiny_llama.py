"""The tiny random Llamas the tensor-parallel tests split: six heads of 16 (2 and 3 ranks both divide them), an
intermediate size and a vocabulary neither divides (uneven MLP slices, a padded vocabulary slice); a test names the
head layout and anything else it changes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM

from tests.reference.tiny_models import VOCAB, save_random_model

DEFAULTS: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=100, num_hidden_layers=2,
                                head_dim=16, num_attention_heads=6, max_position_embeddings=128, bos_token_id=1,
                                eos_token_id=2, pad_token_id=0)


def save_tiny_llama(directory: Path, **config: Any) -> Path:
    """A random Llama with :data:`DEFAULTS` updated by ``config``, saved into ``directory``."""
    save_random_model(LlamaConfig(**{**DEFAULTS, **config}), LlamaForCausalLM, directory, vector_std=0.1)
    return directory
