"""How close decoding comes to the machine's memory bandwidth, measured in the benchmark's own run.

Decoding one token at a small batch streams every weight of the network's matrix products from memory
once, so a decode step cannot be faster than ``weight bytes per step / memory bandwidth``. Two numbers
give that bound: :func:`copy_bandwidth` (a large numpy copy, counting the bytes read plus the bytes
written) and :func:`weight_bytes_per_step` (the initializer bytes that the matrix-product nodes of a
compiled ``model.onnx`` read). The benchmark reports ``bytes/step * steps/s / bandwidth`` per encoding.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

MIB = 2**20
GB = 1e9

# The nodes whose weights a decode step streams in full. A Gather (the embedding table) reads one row per
# token, so an initializer only gathered is not counted; one that a product also reads (a tied output
# head reading the embedding table) is, once.
MATMUL_OPS = frozenset({"MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "FusedMatMul", "QLinearMatMul",
                        "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulBnb4"})


def _copy(src: np.ndarray, dst: np.ndarray, threads: int) -> float:
    """Seconds for copying ``src`` into ``dst``, split over ``threads`` threads (numpy releases the GIL)."""
    chunks = np.array_split(np.arange(src.size), threads)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks if c.size]
    if len(bounds) == 1:
        start = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - start
    workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def copy_bandwidth(mib: int = 512, repeats: int = 5, threads: int = 1) -> dict[str, Any]:
    """Memory bandwidth of a ``mib`` MiB numpy copy, in GB/s (10^9 bytes) of read + write traffic.

    The source is larger than any cache, so every byte comes from and goes to DRAM; the bytes counted are
    ``2 * mib MiB`` per copy (read the source, write the destination; the write-allocate reads of the
    destination's lines are not counted). The destination is written once before timing so page faults
    are not measured. Returns the median, min and max over ``repeats`` copies, and each copy's rate.
    """
    if mib < 1 or repeats < 1 or threads < 1:
        raise ValueError("the copy needs at least 1 MiB, 1 repeat and 1 thread")
    count = mib * MIB // 8
    src = np.full(count, 1.0, dtype=np.float64)
    dst = np.zeros_like(src)
    dst[:] = 2.0  # fault the pages in
    rates = [2 * src.nbytes / _copy(src, dst, threads) / GB for _ in range(repeats)]
    return {"gb_s": statistics.median(rates), "min": min(rates), "max": max(rates), "rates": rates,
            "source_mib": mib, "threads": threads, "counts": "read + write"}


def _initializer_bytes(tensor: Any) -> int:
    """Bytes of an initializer from its shape and element type (no data is read; external data stays on disk)."""
    import onnx

    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(dtype).itemsize


def _nodes(graph: Any) -> Iterable[Any]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:  # the bodies of If / Loop / Scan
            if attribute.g is not None and attribute.g.node:
                yield from _nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _nodes(sub)


def weight_bytes_per_step(model_path: str | Path) -> int:
    """Bytes of the initializers that matrix-product nodes read (weights, scales, zero points, biases).

    Reads the graph only (``load_external_data=False``): each size comes from the initializer's shape and
    type, so a 500 MB ``model.onnx.data`` is never loaded.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    read: set[str] = set()
    for node in _nodes(model.graph):
        if node.op_type in MATMUL_OPS:
            read.update(name for name in node.input if name in initializers)
    return sum(_initializer_bytes(initializers[name]) for name in read)


def artifact_model(artifact_path: str | Path) -> Path:
    """The ``model.onnx`` of a compiled artifact directory (rank 0), as its manifest names it."""
    from ember.compiler.artifact import Artifact, read_manifest

    path = Path(artifact_path)
    return Artifact(path, read_manifest(path)).rank_model(0)


def bandwidth_fraction(bytes_per_step: int | None, steps_per_s: float | None, gb_s: float | None) -> float | None:
    """The share of the measured bandwidth that ``steps_per_s`` decode steps of ``bytes_per_step`` reach."""
    if not bytes_per_step or not steps_per_s or not gb_s:
        return None
    return bytes_per_step * steps_per_s / (gb_s * GB)
