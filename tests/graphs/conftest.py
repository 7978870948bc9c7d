"""Fixtures shared by the GGUF tests (test_gguf_header and test_gguf_weights)."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """A small file written by ``gguf.GGUFWriter``; returns (path, {tensor name: (expected values, qtype)})."""
    # Imported here, not at the top, so that test_custom_ops.py still runs where `gguf` is not installed.
    from .gguf_helpers import QUANTIZED, T, gguf, random_blocks, write_and_close

    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    tensors = {
        "token_embd.weight": (rng.standard_normal((16, 64)).astype(np.float32), T.Q8_0),
        "blk.0.attn_q.weight": (rng.standard_normal((8, 64)).astype(np.float32), T.Q4_1),
        "blk.0.ffn_up.weight": (rng.standard_normal((4, 96)).astype(np.float32), T.Q5_0),
        "blk.0.ffn_down.weight": (None, T.Q6_K),
        "blk.0.attn_norm.weight": (rng.standard_normal(64).astype(np.float32), T.F32),
        "blk.0.conv.weight": (rng.standard_normal((2, 3, 4)).astype(np.float16), T.F16),
        "blk.0.positions": (np.arange(6, dtype=np.int32), T.I32),
    }
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_string("general.name", "tiny ember test")
    w.add_uint32("llama.block_count", 1)
    w.add_int32("test.negative", -7)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "hello", "wörld"])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0])
    expected = {}
    for name, (x, qtype) in tensors.items():
        if qtype == T.Q6_K:
            raw = random_blocks(T.Q6_K, (3, 512), seed=4)
            w.add_tensor(name, raw, raw_dtype=qtype)
            expected[name] = (gguf.quants.dequantize(raw, qtype), qtype)
        elif qtype in QUANTIZED:
            raw = gguf.quants.quantize(x, qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
            expected[name] = (gguf.quants.dequantize(raw, qtype), qtype)
        else:
            w.add_tensor(name, x)
            expected[name] = (x, qtype)
    write_and_close(w)
    return path, expected
