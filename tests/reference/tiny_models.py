"""Tiny random Hugging Face checkpoints, made with transformers' config classes and saved to a folder.

No download: the weights are random (seeded), the tokenizer is a small word-level one. Each variant
exercises a feature the issue names (grouped-query heads, explicit head_dim, tied embeddings, rope
scalings, a sliding window shorter than the prompt, q/k/v bias).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 160
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

VARIANTS = {
    # grouped-query heads, explicit head_dim (32 != 64 / 4), tied embeddings, llama3 rope scaling
    "llama-gqa-llama3": (LlamaConfig, LlamaForCausalLM, dict(
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # multi-query attention, untied output, linear rope scaling
    "llama-mqa-linear": (LlamaConfig, LlamaForCausalLM, dict(
        num_key_value_heads=1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})),
    # sliding window (8) shorter than the prompts
    "mistral-window": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=8,
                                                               tie_word_embeddings=False)),
    # q/k/v bias
    "qwen2-bias": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=False,
                                                       vector_std=0.1)),
    # Llama's attention_bias: q/k/v and o_proj biases
    "llama-attention-bias": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, attention_bias=True,
                                                                 tie_word_embeddings=False, vector_std=0.1)),
}


def save_tokenizer(directory: Path, size: int = VOCAB) -> None:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(4, size):
        vocab[f"w{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)


def make_model(variant: str, directory: Path, seed: int = 0):
    """Save the variant's random checkpoint + tokenizer into ``directory``; returns the torch model."""
    config_class, model_class, extra = VARIANTS[variant]
    extra = dict(extra)
    vector_std = extra.pop("vector_std", 0.0)  # biases off transformers' zero init, so that they are tested
    return save_random_model(config_class(**COMMON, **extra), model_class, directory, seed, vector_std)


def save_random_model(config, model_class, directory: Path, seed: int = 0, vector_std: float = 0.0):
    """A random ``model_class(config)`` (eager attention) and the tokenizer, saved into ``directory``; returns the
    torch model. ``vector_std`` > 0 also moves the 1-D weights (norms, biases) off their initial constants."""
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # larger than the default init, so that logits spread and argmax ties are rare
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif vector_std:
                p.add_(torch.randn_like(p) * vector_std)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return model


def make_word_llama(directory: Path, text: str, extra_words: tuple[str, ...] = (),
                    max_position_embeddings: int = 256, tie_word_embeddings: bool = False):
    """A random 2-layer Llama whose lower-cased word-level vocabulary is ``text``'s words (and ``extra_words``),
    tokenizer saved with it; returns ``(torch model, tokenizer backend)`` (the caller may train it, then saves)."""
    import re

    from tokenizers import normalizers

    words = sorted(set(re.findall(r"\w+|[^\w\s]+", text.lower())) | set(extra_words))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(directory)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), backend
