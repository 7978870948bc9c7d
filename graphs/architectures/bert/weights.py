"""Checkpoint names to ember names for the BERT family (safetensors).

ember names an encoder's weights as ``BertModel`` does, without a prefix
(``embeddings.word_embeddings.weight``, ``encoder.layer.3.attention.self.query.weight``), whatever class
saved the checkpoint:

- task models (``BertForMaskedLM``, ``*ForSequenceClassification``, ...) nest the encoder under ``bert.``
  or ``roberta.``: the prefix is stripped;
- their heads (``cls.*``, ``lm_head.*``, ``classifier.*``) and the pooler are dropped: an embeddings graph
  returns hidden states or pools them itself;
- old (TensorFlow-converted) checkpoints spell LayerNorm parameters ``gamma``/``beta``;
- non-persistent buffers that some checkpoints still carry (``position_ids``, ``token_type_ids``) are
  dropped.

Rules are tried in order and the first full match decides, so each rename rule also strips the prefix.
"""
from __future__ import annotations

from ...weights.adapter import WeightRule

_PREFIX = r"(?:(?:bert|roberta)\.)?"

SAFETENSORS_RULES = [
    # buffers and heads
    WeightRule(_PREFIX + r"embeddings\.(position_ids|token_type_ids)", None),
    WeightRule(r"(cls|lm_head|classifier|qa_outputs)\..*", None),
    WeightRule(_PREFIX + r"pooler\..*", None),
    # TensorFlow-era LayerNorm names
    WeightRule(_PREFIX + r"(.*)\.LayerNorm\.gamma", r"\1.LayerNorm.weight"),
    WeightRule(_PREFIX + r"(.*)\.LayerNorm\.beta", r"\1.LayerNorm.bias"),
    # task models' encoder prefix
    WeightRule(r"(?:bert|roberta)\.(.*)", r"\1"),
]
