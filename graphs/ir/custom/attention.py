"""``ember.CachedAttention``: causal grouped-query attention over a contiguous KV cache, with rotary positions.

Layers emit this one op; each target lowers it to the kernel it runs best (``ort-cpu``:
``com.microsoft.GroupQueryAttention`` with the cache updated in place). The op's meaning is fixed here,
by the schema's doc and by :func:`attention_reference`, which the reference evaluator runs.

Rows are right-padded: row ``b`` holds ``input_lengths[b]`` new tokens that follow the
``cache_lengths[b]`` tokens already in its cache slot. Token ``i`` of row ``b`` sits at position
``p = cache_lengths[b] + i``: rotary embedding uses ``p``, its key and value are written at ``p`` in
``present_key``/``present_value`` (which equal ``past_key``/``past_value`` elsewhere), and it attends to
cache positions ``j <= p`` (and ``j > p - sliding_window`` when a window is set). Outputs of padding rows
(``i >= input_lengths[b]``) are unspecified; the reference returns zeros.

Scores are ``q . k * scale`` (``scale`` 0: ``1 / sqrt(head_dim)``; Gemma 2 sets ``query_pre_attn_scalar ** -0.5``),
then, with ``softcap`` > 0, ``softcap * tanh(scores / softcap)`` (Gemma 2's attention-logit soft-capping, which
bounds the logits before the mask and the softmax, as transformers' eager attention does).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx.defs import OpSchema
from onnx.helper import make_attribute

from ..graph import current_graph
from ..ops import dims, dtype
from ..versions import EMBER_DOMAIN, EMBER_OPSET

_OPTIONAL = OpSchema.FormalParameterOption.Optional

# What every cached-attention op (this one, PagedAttention) shares: the new tokens, the lengths, the rotary
# tables and the attributes.
NEW_TOKEN_INPUTS = [
    OpSchema.FormalParameter("query", "T", "[batch, seq, num_heads * head_dim]"),
    OpSchema.FormalParameter("key", "T", "[batch, seq, kv_num_heads * head_dim]"),
    OpSchema.FormalParameter("value", "T", "[batch, seq, kv_num_heads * head_dim]"),
]
LENGTH_INPUTS = [
    OpSchema.FormalParameter("cache_lengths", "I", "[batch]: tokens already cached per row"),
    OpSchema.FormalParameter("input_lengths", "I", "[batch]: valid new tokens per row"),
]
ROTARY_INPUTS = [
    OpSchema.FormalParameter("cos_cache", "T", "[max_positions, rotary_dim / 2]", param_option=_OPTIONAL),
    OpSchema.FormalParameter("sin_cache", "T", "[max_positions, rotary_dim / 2]", param_option=_OPTIONAL),
]
OUTPUT = OpSchema.FormalParameter("output", "T", "[batch, seq, num_heads * head_dim]")
ACTIVATION_TYPES = ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations")
HEAD_ATTRIBUTES = [
    OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads", required=True),
    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads", required=True),
]
OPTION_ATTRIBUTES = [
    OpSchema.Attribute("scale", make_attribute("scale", 0.0), "softmax scale; 0 means 1/sqrt(head_dim)"),
    OpSchema.Attribute("softcap", make_attribute("softcap", 0.0),
                       "softcap * tanh(scores / softcap) on the scaled scores; 0: no capping"),
    OpSchema.Attribute("sliding_window", make_attribute("sliding_window", 0),
                       "attend to at most this many positions (itself included); 0: all"),
    OpSchema.Attribute("rotary_interleaved", make_attribute("rotary_interleaved", 0),
                       "1: rotate pairs (x0,x1); 0: rotate halves (HF rotate_half)"),
]

SCHEMA = OpSchema(
    "CachedAttention", EMBER_DOMAIN, EMBER_OPSET,
    doc=__doc__,
    inputs=[
        *NEW_TOKEN_INPUTS,
        OpSchema.FormalParameter("past_key", "T", "[batch, kv_num_heads, max_len, head_dim]"),
        OpSchema.FormalParameter("past_value", "T", "[batch, kv_num_heads, max_len, head_dim]"),
        *LENGTH_INPUTS,
        *ROTARY_INPUTS,
    ],
    outputs=[
        OUTPUT,
        OpSchema.FormalParameter("present_key", "T", "past_key with the new keys written"),
        OpSchema.FormalParameter("present_value", "T", "past_value with the new values written"),
    ],
    type_constraints=[ACTIVATION_TYPES, ("I", ["tensor(int32)"], "lengths")],
    attributes=[*HEAD_ATTRIBUTES, *OPTION_ATTRIBUTES],
)


def option_attributes(scale: float = 0.0, softcap: float = 0.0, sliding_window: int = 0,
                      rotary_interleaved: bool = False) -> dict:
    """The :data:`OPTION_ATTRIBUTES` as node attributes, typed as the schema declares them (both ops emit them)."""
    if softcap < 0 or scale < 0 or sliding_window < 0:
        raise ValueError(f"scale ({scale}), softcap ({softcap}) and sliding_window ({sliding_window}) must not be "
                         f"negative (0: the default)")
    return {"scale": float(scale), "softcap": float(softcap), "sliding_window": int(sliding_window),
            "rotary_interleaved": int(rotary_interleaved)}


def attention(query: ir.Value, key: ir.Value, value: ir.Value, past_key: ir.Value, past_value: ir.Value,
              cache_lengths: ir.Value, input_lengths: ir.Value, cos_cache: ir.Value | None,
              sin_cache: ir.Value | None, *, num_heads: int, kv_num_heads: int, scale: float = 0.0,
              softcap: float = 0.0, sliding_window: int = 0,
              rotary_interleaved: bool = False) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Emit ``ember.CachedAttention``; returns ``(output, present_key, present_value)``."""
    inputs: list[ir.Value | None] = [query, key, value, past_key, past_value, cache_lengths, input_lengths]
    if cos_cache is not None:
        inputs += [cos_cache, sin_cache]
    attrs = {"num_heads": num_heads, "kv_num_heads": kv_num_heads,
             **option_attributes(scale, softcap, sliding_window, rotary_interleaved)}
    kv_shape = dims(past_key)
    out, pk, pv = current_graph().add_node(
        "CachedAttention", inputs, attrs, domain=EMBER_DOMAIN,
        outputs=[(dtype(query), dims(query)), (dtype(past_key), kv_shape), (dtype(past_value), kv_shape)])
    return out, pk, pv


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """Rotate the first ``2 * cos.shape[-1]`` features of ``x`` [..., S, D] by per-position cos/sin [S, R/2]."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        rotated = np.stack([r1, r2], axis=-1).reshape(rot.shape)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return np.concatenate([rotated, rest], axis=-1).astype(x.dtype)


def attention_reference(query, key, value, past_key, past_value, cache_lengths, input_lengths, cos_cache=None,
                        sin_cache=None, *, num_heads: int, kv_num_heads: int, scale: float = 0.0,
                        softcap: float = 0.0, sliding_window: int = 0, rotary_interleaved: int = 0):
    """numpy semantics of ``ember.CachedAttention`` (see the module doc)."""
    batch, seq, _ = query.shape
    head_dim = query.shape[2] // num_heads
    group = num_heads // kv_num_heads
    scale = scale or 1.0 / np.sqrt(head_dim)
    q = query.reshape(batch, seq, num_heads, head_dim).transpose(0, 2, 1, 3)
    k = key.reshape(batch, seq, kv_num_heads, head_dim).transpose(0, 2, 1, 3)
    v = value.reshape(batch, seq, kv_num_heads, head_dim).transpose(0, 2, 1, 3)
    present_key, present_value = past_key.copy(), past_value.copy()
    out = np.zeros((batch, num_heads, seq, head_dim), dtype=query.dtype)
    for b in range(batch):
        start, n = int(cache_lengths[b]), int(input_lengths[b])
        positions = start + np.arange(n)
        qb, kb = q[b, :, :n], k[b, :, :n]
        if cos_cache is not None:
            qb = apply_rotary(qb, cos_cache[positions], sin_cache[positions], bool(rotary_interleaved))
            kb = apply_rotary(kb, cos_cache[positions], sin_cache[positions], bool(rotary_interleaved))
        present_key[b, :, start:start + n] = kb
        present_value[b, :, start:start + n] = v[b, :, :n]
        total = start + n
        keys = np.repeat(present_key[b, :, :total], group, axis=0).astype(np.float32)
        values = np.repeat(present_value[b, :, :total], group, axis=0).astype(np.float32)
        scores = qb.astype(np.float32) @ keys.transpose(0, 2, 1) * scale
        if softcap > 0:
            scores = softcap * np.tanh(scores / softcap)
        allowed = np.arange(total)[None, :] <= positions[:, None]
        if sliding_window > 0:
            allowed &= np.arange(total)[None, :] > positions[:, None] - sliding_window
        scores = np.where(allowed[None], scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        out[b, :, :n] = (probs @ values).astype(query.dtype)
    return out.transpose(0, 2, 1, 3).reshape(batch, seq, num_heads * head_dim), present_key, present_value
