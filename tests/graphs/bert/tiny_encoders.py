"""Tiny random BERT / RoBERTa / XLM-R checkpoints made with transformers' config classes, and helpers that
build, lower and run ember's encoder graph for them.

No download: weights are random (seeded, LayerNorm parameters too, so a swapped or missing weight shows),
saved with ``save_pretrained`` to a folder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from transformers import (BertConfig, BertForMaskedLM, BertModel, RobertaConfig, RobertaModel, XLMRobertaConfig,
                          XLMRobertaModel)

from ember.compiler.compile import CompileOptions
from ember.compiler.targets import get_target
from ember.graphs.architectures.bert import SPEC
from ember.graphs.weights import SafetensorsWeights

VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

VARIANTS = {
    # BERT: positions 0..S-1, two token types, exact GELU
    "bert": (BertConfig, BertModel, dict(max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)),
    # the same encoder saved with its MLM head (``bert.`` prefix, ``cls.*`` head dropped)
    "bert-mlm": (BertConfig, BertForMaskedLM, dict(max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)),
    # RoBERTa: positions after padding_idx, one token type
    "roberta": (RobertaConfig, RobertaModel, dict(hidden_size=48, max_position_embeddings=66, type_vocab_size=1,
                                                  pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    # XLM-R: padding_idx positions, tanh GELU, two token types
    "xlm-roberta": (XLMRobertaConfig, XLMRobertaModel, dict(hidden_size=64, max_position_embeddings=66,
                                                           type_vocab_size=2, pad_token_id=1, hidden_act="gelu_new")),
}


def make_model(variant: str, directory: Path, seed: int = 0):
    """Save the variant's random checkpoint into ``directory``; returns the torch model (eager attention)."""
    config_class, model_class, extra = VARIANTS[variant]
    config = config_class(**{**COMMON, **extra}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
            elif "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    return model


def encoder_of(model):
    """The ``BertModel``/``RobertaModel`` inside a task model."""
    return getattr(model, "bert", None) or getattr(model, "roberta", None) or model


def padded_batch(config, lengths=(9, 4, 7), seed: int = 0):
    """Right-padded ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64) of rows of ``lengths``."""
    rng = np.random.default_rng(seed)
    batch, width = len(lengths), max(lengths)
    pad = config.pad_token_id
    ids = np.full((batch, width), pad, np.int64)
    mask = np.zeros((batch, width), np.int64)
    types = np.zeros((batch, width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, config.vocab_size, n)
        mask[row, :n] = 1
        if config.type_vocab_size > 1:
            types[row, n // 2:n] = 1  # a second segment, as for sentence pairs
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def build(config, directory: Path, pooling: str | None = None, normalize: bool = False) -> ir.Model:
    return SPEC.build(config, SafetensorsWeights(directory), "safetensors",
                      CompileOptions(pooling=pooling, normalize=normalize).graph_options())


def session_for(model: ir.Model, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime session over the ort-cpu lowering of ``model`` (which is changed in place)."""
    lowered = get_target("ort-cpu").lower(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(ir.to_proto(lowered).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def hf_last_hidden_state(model, feeds) -> np.ndarray:
    with torch.no_grad():
        out = encoder_of(model)(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return out.last_hidden_state.numpy()
