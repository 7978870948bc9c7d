"""The pieces of ``ember embed`` and ``ember bench --embeddings`` that need no model: reading inputs,
the printed forms, cosine similarities and the benchmark sentences."""
from __future__ import annotations

import numpy as np
import pytest

from ember.tools.bench_embeddings import bench_sentences
from ember.tools.bench_report import format_embeddings_report, format_report
from ember.tools.embed import (cosine_similarity, format_embeddings, format_similarity, output_path, read_lines,
                               rowwise_cosine, save_embeddings)


class WordTokenizer:
    """One token per word, plus two special tokens around a text (as BERT's [CLS] ... [SEP])."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [len(w) for w in text.split()]
        return [101, *ids, 102] if add_special_tokens else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]


def test_read_lines_keeps_empty_lines_and_only_splits_on_newlines(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes("\ufeffone\r\n\ntwo\u2028still two\nlast".encode())
    assert read_lines(path) == ["one", "", "two\u2028still two", "last"]
    path.write_text("a\n\n", encoding="utf-8")
    assert read_lines(path) == ["a", ""]
    path.write_text("\n", encoding="utf-8")
    assert read_lines(path) == [""]
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        read_lines(path)
    with pytest.raises(FileNotFoundError):
        read_lines(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="not a file"):
        read_lines(tmp_path)
    path.write_bytes(b"\xff\xfe not utf-8 \xc3")
    with pytest.raises(ValueError):  # UnicodeDecodeError: a clean CLI error
        read_lines(path)


def test_cosine_similarity_and_zero_rows():
    a = np.array([[3.0, 4.0], [0.0, 0.0], [-3.0, -4.0]], dtype=np.float32)
    m = cosine_similarity(a)
    np.testing.assert_allclose(m, [[1, 0, -1], [0, 0, 0], [-1, 0, 1]], atol=1e-7)
    np.testing.assert_allclose(rowwise_cosine(a, 2 * a), [1, 0, 1], atol=1e-7)
    with pytest.raises(ValueError):
        rowwise_cosine(a, a[:2])


def test_printed_forms():
    vectors = np.arange(2 * 8, dtype=np.float32).reshape(2, 8) / 100
    text = format_embeddings(["short", "x" * 100 + "\n"], vectors)
    first, second = text.splitlines()
    assert first.startswith("[0] (8,)") and '"short"' in first and "+0.0500 …]" in first
    assert second.endswith('…"') and len(second) < 160
    table = format_similarity(cosine_similarity(vectors)).splitlines()
    assert table[0] == "cosine similarity:" and table[1].split() == ["[0]", "[1]"]
    assert table[2].split()[0] == "[0]" and table[2].split()[1] == "1.0000"


def test_save_embeddings_adds_npy(tmp_path):
    written = save_embeddings(tmp_path / "out", np.ones((2, 3), np.float32))
    assert written == tmp_path / "out.npy" and np.load(written).shape == (2, 3)
    assert output_path(tmp_path / "x.npy") == tmp_path / "x.npy"
    with pytest.raises(FileNotFoundError):
        save_embeddings(tmp_path / "missing" / "out.npy", np.ones((1, 1), np.float32))
    (tmp_path / "folder.npy").mkdir()
    with pytest.raises(ValueError, match="directory"):
        output_path(tmp_path / "folder.npy")


def test_bench_sentences_are_distinct_windows_of_about_the_target_length():
    tokenizer = WordTokenizer()
    sentences = bench_sentences(tokenizer, 1024, 30)
    assert len(sentences) == 1024 and len(set(sentences)) == 1024
    lengths = [len(tokenizer.encode(s)) for s in sentences]
    assert min(lengths) >= 28 and max(lengths) <= 32 and abs(np.mean(lengths) - 30) < 0.5
    # Targets cycle 3, 4, 5 tokens (2 special); windows wrap around the text's end, never past its length.
    assert bench_sentences(tokenizer, 3, 5, text="a b c") == ["a", "c a", "b c a"]
    assert bench_sentences(tokenizer, 1, 100, text="a b c") == ["a b c"]
    with pytest.raises(ValueError):
        bench_sentences(tokenizer, 0, 30)


def _summary(value):
    return {"median": value, "min": value, "max": value}


def test_embeddings_report_and_text_report_share_the_table():
    report = {"artifact": "/a", "setup": "loaded", "encoding": "w8a8", "threads": 2, "sentences": 64, "batch_size": 32,
              "sentence_tokens": {"target": 30, "mean": 29.9, "min": 27, "max": 33}, "latency_encodes": 50,
              "runs": 1, "warmup": 1, "ember": {"sentences_per_s": _summary(500.0), "latency_s": _summary(0.004)},
              "memory": {"ember": {"peak_rss_mib": 300.0, "rss_mib": 290.0}}}
    text = format_embeddings_report(report)
    assert "encoding w8a8; 64 sentences of 27-33 tokens (mean 29.9) at batch 32" in text
    assert "throughput (sentences/s)" in text and "4.00" in text and "500.0" in text
    text_report = {"artifact": "/a", "setup": "loaded", "threads": 2, "prompt_tokens": 8, "new_tokens": 8,
                   "runs": 1, "warmup": 0, "ember": {"ttft_s": _summary(0.01), "decode_tok_s": _summary(50.0)},
                   "memory": {"ember": {"peak_rss_mib": 300.0, "rss_mib": 290.0}}}
    lines = format_report(text_report).splitlines()
    assert lines[5] == f"{'':<8}{'metric':<16}{'median':>10}{'min':>10}{'max':>10}"  # unchanged layout
