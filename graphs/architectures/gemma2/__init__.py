"""Gemma 2 decoders (``Gemma2ForCausalLM``): Llama's structure with Gemma 2's differences as parameters.

- embeddings times ``sqrt(hidden_size)`` (``Embedding.scale``), the output head tied to the unscaled table;
- RMSNorm with ``(1 + weight)``: folded into the weight when the checkpoint is read (:mod:`.weights`);
- four norms per block, the two extra ones on each sub-layer's output (``TransformerBlock``'s sandwich norms);
- attention scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped, ``cap * tanh(scores / cap)``
  (``Attention.scale`` / ``softcap``, the attention ops' attributes); final logits soft-capped
  (``Transformer.logit_softcap``);
- sliding and global layers alternating (``layer_types``), ``gelu_pytorch_tanh`` MLP, explicit ``head_dim``.

No GGUF: the spec lists no GGUF architecture, so loading one says which are supported.
"""
from __future__ import annotations

from .config import ARCHITECTURE, Gemma2ArchConfig
from .spec import SPEC, build_transformer
from .weights import SAFETENSORS_RULES

__all__ = ["ARCHITECTURE", "SAFETENSORS_RULES", "SPEC", "Gemma2ArchConfig", "build_transformer"]
