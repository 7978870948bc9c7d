"""Static scales for an int8 KV cache, measured at compile time on the float model.

Why static: onnxruntime's GroupQueryAttention quantizes each key and value as it writes them into the cache
(``q = clip(round_half_to_even(x / scale), -128, 127)``, ``tests/compiler/test_kv_cache_int8.py`` pins it) with
``k_scale`` / ``v_scale`` that are fixed for the life of the cache: a token written in the prompt is read back
with the same scale thousands of steps later, so a scale cannot follow the data and is measured once, here.

How: the lowered float graph (the one the int8 graph is derived from, with its weights already encoded as
they will run) prefills calibration tokens in onnxruntime: a few hundred tokens of varied English
(:data:`CALIBRATION_TEXT`, through the model's chat template where it has one) as one long row plus short
windows of it that each start at position 0 (the first positions attend to few tokens and carry the most extreme
values); or, when the tokenizer turns that text into few distinct ids (the word-level tokenizers of tiny test
models), seeded random ids in the same shape. Per layer, KV head and channel it records the largest ``|V|`` and
the largest ``|K|``. Keys are cached after rotary embedding, which turns each channel pair (``i``,
``i + rotary_dim / 2``; ``2i``, ``2i + 1`` when interleaved) by a position-dependent angle: the pair's length is
the same at every position, its split between the two channels is not, and slow pairs barely turn within the
calibration text. So a rotated key channel is bounded by its pair's largest length, which holds at any position.

``scale = MARGIN * max / 127``: values up to ``MARGIN`` times anything seen are represented, larger ones
saturate (the kernel clips). 1.5 because calibration does not see every extreme: the tiny random Llama's test
prompts go past its calibrated ranges (logit error 2.4e-2 at 1.25, 1.3e-2 at 1.5, 2e-2 at 2.0, where rounding
takes over), while SmolLM2's error hardly moves between 1.0 and 2.0. A channel that
never exceeded 1 % of its layer's largest value gets that floor, so that an activation unseen in calibration
saturates at a small value instead of dividing by zero.

What it costs (``tests/reference/test_kv_cache_int8.py``, ``test_smollm2_kv_int8.py``): int8 steps are ~1 % of a
channel's range, which moves SmolLM2-135M's logits by ~3 % (its keys reach |20| and its attention is sharp; even
per-token dynamic int8 does no better) and changes its top token at a few % of the steps.
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ..graph_runner import GraphRunner
from ..passes.base import name_of
from ..passes.lower_attention_gqa import gqa_kv_caches, quantize_kv_cache

logger = logging.getLogger(__name__)

MARGIN = 1.5
CALIBRATION_TOKENS = 384  # the long row
SHORT_ROW, SHORT_ROWS = 32, 8
MIN_DISTINCT_IDS = 64  # fewer distinct ids than this from the text: the tokenizer does not know English
CHANNEL_FLOOR = 0.01
QMAX = {8: 127}

CALIBRATION_TEXT = """\
The river that runs past the old mill is neither wide nor deep, but it has shaped the valley for longer than \
anyone can remember. In 1887 a flood carried away the bridge, two barns and most of the miller's savings; the \
town rebuilt the bridge in stone the following year, at a cost of 4,250 pounds.

"Will it hold this time?" asked Mara, leaning over the parapet. Her grandfather laughed. "It has held for a \
hundred and thirty-six years. Ask me again in another hundred."

Questions people ask about the valley, with short answers:
1. How long is the river? About 48 km (30 miles) from the spring to the sea.
2. What lives in it? Trout, eels, otters, and in summer far too many mosquitoes.
3. Can you swim there? Yes, below the weir, where the water is 2.5 m deep and calm.

To count the visitors at the mill each month, the museum uses a short script:

    def monthly_totals(visits):
        totals = {}
        for day, count in visits:
            totals[day[:7]] = totals.get(day[:7], 0) + count
        return dict(sorted(totals.items()))

Le moulin est ouvert du mardi au dimanche, de 10 h à 17 h. Der Eintritt ist frei für Kinder unter 12 Jahren.

Scientists who study rivers like this one measure the flow in cubic metres per second: 0.8 in a dry August, \
more than 60 during the worst storms. They say the valley floor is rising by roughly one millimetre a year, as \
each flood leaves a thin layer of silt behind. Over ten thousand years that adds up to ten metres of the \
richest soil in the county, which is why the farms here are small, old, and almost never for sale.

Summary: a modest river, a stubborn town, and a mill that has outlived everyone who built it. If you visit, \
bring boots, a sandwich and a little patience; the herons will show you how it is done."""


def calibration_tokens(encode: Callable[[str], Sequence[int]] | None, vocab_size: int,
                       max_tokens: int = CALIBRATION_TOKENS, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """Rows of token ids to calibrate on, each prefilled from position 0, and where they came from (``"text"`` or
    ``"random"``): one long row and :data:`SHORT_ROWS` rows of :data:`SHORT_ROW` tokens, so that the first
    positions of a sequence (which attend to few tokens and carry the most extreme values) are seen several
    times, starting with different tokens.

    ``encode`` turns :data:`CALIBRATION_TEXT` into ids (the model's tokenizer, with its chat template where it
    has one; the short rows are windows of those ids); without it, or when the ids are not varied enough to
    stand for real inputs, seeded random ids.
    """
    ids = np.asarray(list(encode(CALIBRATION_TEXT)) if encode is not None else [], dtype=np.int64)
    short = min(SHORT_ROW, max_tokens)
    if len(set(ids.tolist())) >= MIN_DISTINCT_IDS:
        starts = np.linspace(0, len(ids) - short, SHORT_ROWS).astype(int)
        return [ids[:max_tokens]] + [ids[s:s + short] for s in starts], "text"
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, n).astype(np.int64) for n in [max_tokens] + [short] * SHORT_ROWS], "random"


def measure_kv_ranges(model: ir.Model, rows: Sequence[np.ndarray], runner: GraphRunner) -> dict[str, np.ndarray]:
    """Per past-KV input name: the largest ``|x|`` cached per (kv head, channel) when ``model`` prefills ``rows``
    (token id sequences, each from position 0; rows of equal length run as one batch) on ``runner`` (a runtime
    backend); keys with rotary pairs combined (see the module doc)."""
    caches = gqa_kv_caches(model)
    known = {"input_ids", "input_lengths", "cache_lengths"} | {n for c in caches for n in (c.key, c.value)}
    extra = [name_of(v) for v in model.graph.inputs if v.name not in known]
    if extra:
        raise ValueError(f"KV cache calibration cannot feed the graph inputs {', '.join(extra)}")
    batches: dict[int, list[np.ndarray]] = {}
    for row in rows:
        batches.setdefault(len(row), []).append(np.asarray(row, np.int64))
    ranges: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="ember-kv-calibration-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        for length, batch in batches.items():
            inputs = {"input_ids": np.stack(batch), "input_lengths": np.full(len(batch), length, np.int32),
                      "cache_lengths": np.zeros(len(batch), np.int32)}
            buffers: dict[str, np.ndarray] = {}
            in_place: dict[str, tuple[str, np.ndarray]] = {}
            for cache in caches:
                for name, output in ((cache.key, cache.present_key), (cache.value, cache.present_value)):
                    buffers[name] = np.zeros((len(batch), cache.kv_num_heads, length, cache.head_dim), np.float32)
                    in_place[name] = (output, buffers[name])  # shared, as the runtime binds them
            runner.run_graph(path, inputs, in_place)
            for cache in caches:  # [batch, heads, positions, dim] -> [heads, batch * positions, dim]
                keys, values = (buffers[n].transpose(1, 0, 2, 3).reshape(cache.kv_num_heads, -1, cache.head_dim)
                                for n in (cache.key, cache.value))
                found = {cache.value: np.abs(values).max(axis=1),
                         cache.key: rotation_invariant_range(keys, cache.rotary_dim, cache.rotary_interleaved)}
                for name, bound in found.items():
                    ranges[name] = np.maximum(ranges[name], bound) if name in ranges else bound
    return ranges


def rotation_invariant_range(keys: np.ndarray, rotary_dim: int, interleaved: bool) -> np.ndarray:
    """``keys`` [kv_heads, positions, head_dim] -> [kv_heads, head_dim]: per channel the largest ``|k|``, where
    a rotated channel takes its pair's largest length ``sqrt(k_i^2 + k_j^2)``."""
    bound = np.abs(keys).max(axis=1)
    if rotary_dim:
        rot = keys[..., :rotary_dim]
        first, second = (rot[..., 0::2], rot[..., 1::2]) if interleaved else \
            (rot[..., :rotary_dim // 2], rot[..., rotary_dim // 2:])
        pair = np.sqrt(first.astype(np.float64) ** 2 + second.astype(np.float64) ** 2).max(axis=1)
        if interleaved:
            bound[..., 0:rotary_dim:2] = pair
            bound[..., 1:rotary_dim:2] = pair
        else:
            bound[..., :rotary_dim // 2] = pair
            bound[..., rotary_dim // 2:rotary_dim] = pair
    return bound.astype(np.float32)


def scales_from_ranges(ranges: dict[str, np.ndarray], bit_width: int, margin: float = MARGIN) -> dict[str, np.ndarray]:
    """Symmetric dequantization scales [kv_heads, head_dim] from the measured ranges (see the module doc)."""
    qmax = QMAX[bit_width]
    scales = {}
    for name, bound in ranges.items():
        floor = CHANNEL_FLOOR * float(bound.max()) or 1.0
        scales[name] = (margin * np.maximum(bound, floor) / qmax).astype(np.float32)
    return scales


def calibrate_kv_cache(model: ir.Model, bit_width: int, rows: Sequence[np.ndarray] | None, *,
                       runner: GraphRunner | None, vocab_size: int | None = None, max_tokens: int | None = None,
                       token_source: str = "text") -> tuple[ir.Model, dict[str, Any]]:
    """Measure the float model's KV ranges on ``rows`` of token ids (each cut to ``max_tokens``, the model's
    positions; seeded random ids when None) and rewrite it to keep an integer KV cache with the resulting scales.
    Returns the model and a summary for the artifact's manifest."""
    if bit_width not in QMAX:
        raise ValueError(f"a {bit_width}-bit KV cache cannot be calibrated; supported: {', '.join(map(str, QMAX))}")
    if runner is None:
        raise ValueError("a KV cache calibration runs the float model: pass a runtime backend to run it (runner=)")
    max_tokens = max_tokens or CALIBRATION_TOKENS
    if rows is None:
        if vocab_size is None:
            raise ValueError("KV cache calibration needs tokens or the vocabulary size")
        rows, token_source = calibration_tokens(None, vocab_size, min(max_tokens, CALIBRATION_TOKENS))
    rows = [np.asarray(row, dtype=np.int64)[:max_tokens] for row in rows if len(row)]
    start = time.perf_counter()
    ranges = measure_kv_ranges(model, rows, runner)
    model = quantize_kv_cache(model, bit_width, scales_from_ranges(ranges, bit_width))
    seconds = time.perf_counter() - start
    tokens = sum(len(row) for row in rows)
    largest = max(float(r.max()) for r in ranges.values())
    logger.info("calibrated a %d-bit KV cache on %d %s tokens (%d rows) in %.1f s (largest |K|,|V| %.3g)", bit_width,
                tokens, token_source, len(rows), seconds, largest)
    return model, {"bit_width": bit_width, "scheme": "symmetric, static per (kv head, channel)",
                   "calibration": {"tokens": tokens, "rows": len(rows), "source": token_source, "margin": MARGIN}}
