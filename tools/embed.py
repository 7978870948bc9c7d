"""Embedding texts for ``ember embed``: reading the inputs, checking their length, and the printed forms
(one line per embedding, the cosine-similarity table, the summary of a file run)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PREVIEW_VALUES = 6
PREVIEW_CHARS = 48


def read_lines(path: str | Path) -> list[str]:
    """One input per line, nothing skipped: an empty line is an empty string. ``-`` reads stdin.

    Only ``\\n`` (with an optional ``\\r`` before it) ends a line, so text with other Unicode line
    separators stays one input; the newline that ends the last line does not start another.
    """
    if str(path) == "-":
        text = sys.stdin.read()
    else:
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no such file: {path}")
        if not path.is_file():
            raise ValueError(f"{path} is not a file")
        text = path.read_text(encoding="utf-8-sig")  # a UnicodeDecodeError is a ValueError: a clean error
    if not text:
        raise ValueError(f"{path} is empty: nothing to embed")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def check_lengths(pipeline: Any, texts: list[str], what: str) -> None:
    """With truncation off: a ValueError naming the first input longer than the model's maximum (``what``
    turns an index into words: ``"line {n} of FILE"`` or ``"TEXT {n}"``), before any embedding is done."""
    if pipeline.pipeline_config.truncation:
        return
    maximum = pipeline.max_length
    for i, ids in enumerate(pipeline.tokenizer.encode_batch(texts)):
        if len(ids) > maximum:
            raise ValueError(f"{what.format(n=i + 1)} has {len(ids)} tokens, more than the model's maximum of "
                             f"{maximum} tokens (--no-truncation is set; drop it to truncate, or shorten the input)")


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # [n, dim] float32
    seconds: float

    @property
    def sentences_per_second(self) -> float:
        return len(self.embeddings) / self.seconds if self.seconds > 0 else float("inf")


def embed_texts(pipeline: Any, texts: list[str], *, batch_size: int = 32, progress: bool = False) -> EmbedResult:
    """The ``[len(texts), dim]`` float32 embeddings, in the order given, and the time they took."""
    if batch_size < 1:
        raise ValueError(f"the batch size must be positive, got {batch_size}")
    start = time.perf_counter()
    embeddings = pipeline.encode(texts, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    return EmbedResult(np.ascontiguousarray(embeddings, dtype=np.float32), seconds)


def output_path(path: str | Path) -> Path:
    """The file ``numpy.save`` will write for ``--output`` (it adds ``.npy`` when the name lacks it), checked
    before any work is done: its folder must exist and it must not be a folder itself."""
    path = Path(path).expanduser()
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    if path.is_dir():
        raise ValueError(f"--output {path} is a directory; name a .npy file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--output: the directory {path.parent} does not exist")
    return path


def save_embeddings(path: str | Path, embeddings: np.ndarray) -> Path:
    """``numpy.save`` the ``[n, dim]`` array; returns the file written."""
    path = output_path(path)
    np.save(path, np.ascontiguousarray(embeddings, dtype=np.float32))
    return path


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def cosine_similarity(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Every row of ``a`` against every row of ``b`` (of ``a`` itself without ``b``): ``[len(a), len(b)]``.
    A zero row has similarity 0 with everything."""
    ua = _unit_rows(a)
    return ua @ (ua if b is None else _unit_rows(b)).T


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine similarity of each row of ``a`` with the same row of ``b``: ``[len(a)]``."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare embeddings of shapes {a.shape} and {b.shape}")
    return np.einsum("ij,ij->i", _unit_rows(a), _unit_rows(b))


def _shorten(text: str, limit: int = PREVIEW_CHARS) -> str:
    shown = text if len(text) <= limit else text[:limit - 1] + "…"
    return json.dumps(shown, ensure_ascii=False)  # quoted, with newlines and tabs visible


def format_embeddings(texts: list[str], embeddings: np.ndarray) -> str:
    """One line per input: index, shape, the first values and the text (shortened)."""
    width = len(str(len(texts) - 1))
    lines = []
    for i, (text, vector) in enumerate(zip(texts, embeddings)):
        head = " ".join(f"{v:+.4f}" for v in vector[:PREVIEW_VALUES])
        more = " …" if vector.shape[0] > PREVIEW_VALUES else ""
        lines.append(f"[{i:>{width}}] {str(tuple(vector.shape)):<8} [{head}{more}]  {_shorten(text)}")
    return "\n".join(lines)


def format_similarity(matrix: np.ndarray) -> str:
    """The cosine-similarity matrix as an aligned table with row and column indices."""
    n = matrix.shape[0]
    label = max(len(str(n - 1)), 1) + 2
    cell = 8
    lines = ["cosine similarity:",
             " " * label + "".join(f"{f'[{j}]':>{cell}}" for j in range(n))]
    for i in range(n):
        lines.append(f"{f'[{i}]':<{label}}" + "".join(f"{matrix[i, j]:>{cell}.4f}" for j in range(n)))
    return "\n".join(lines)


def format_summary(result: EmbedResult, source: str) -> str:
    n, dim = result.embeddings.shape
    return (f"embedded {n} sentence{'s' if n != 1 else ''} from {source}: {n} x {dim} float32 in "
            f"{result.seconds:.2f} s ({result.sentences_per_second:.1f} sentences/s)")
