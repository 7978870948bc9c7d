"""Does a paged decode step cost O(new tokens) or O(pool)? Time one layer's lowered ``ember.PagedAttention``.

The ort-cpu lowering writes new K/V into the page pool with ``ScatterND``, whose CPU kernel copies its input
to its output unless the two are the same buffer. This times one decode step (batch 1, one new token, a
context of ``--context`` tokens) of a single SmolLM2-135M-sized attention layer (9 query heads, 3 kv heads,
head_dim 64) over pools of several sizes, three ways:

- ``in place``: one OrtValue bound (IOBinding) as both ``key_cache.0`` and ``key_cache_out.0`` (the runtime's way);
- ``separate``: the output bound to a second preallocated OrtValue (the kernel must copy the pool);
- ``scatter only``: a graph of just the two ScatterND nodes, bound in place (the write alone).

The median of ``--runs`` steps after a warm-up; the in-place time should not grow with the pool.

    python -m ember.tools.bench_paged_scatter [--pool-rows 1024 16384 131072] [--runs 200]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ember.compiler.passes.cleanup import remove_unused
from ember.compiler.passes.lower_paged_attention import lower_paged_attention
from ember.graphs.ir.custom import paged_attention
from ember.graphs.ir.graph import Graph

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 9, 3, 64, 128


def layer_model(scatter_only: bool) -> bytes:
    """One lowered PagedAttention layer (or just its ScatterND writes) as a serialized model."""
    f, i32, i64 = ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.INT64
    with Graph("paged_layer") as g:
        q = g.add_input("query", f, ["batch", "sequence", HEADS * HEAD_DIM])
        k = g.add_input("key", f, ["batch", "sequence", KV_HEADS * HEAD_DIM])
        v = g.add_input("value", f, ["batch", "sequence", KV_HEADS * HEAD_DIM])
        caches = [g.add_input(f"{kind}_cache.0", f, ["pool_rows", KV_HEADS, HEAD_DIM]) for kind in ("key", "value")]
        page_table = g.add_input("page_table", i32, ["batch", "pages"])
        slot_mapping = g.add_input("slot_mapping", i64, ["batch", "sequence"])
        cache_lengths = g.add_input("cache_lengths", i32, ["batch"])
        input_lengths = g.add_input("input_lengths", i32, ["batch"])
        angles = np.arange(8192)[:, None] / 10000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)[None, :]
        cos = g.add_constant(np.cos(angles).astype(np.float32), "rotary.cos_cache")
        sin = g.add_constant(np.sin(angles).astype(np.float32), "rotary.sin_cache")
        out, key_out, value_out = paged_attention(q, k, v, caches[0], caches[1], page_table, slot_mapping,
                                                  cache_lengths, input_lengths, cos, sin, num_heads=HEADS,
                                                  kv_num_heads=KV_HEADS, page_size=PAGE_SIZE)
        g.add_output(out, "output")
        g.add_output(key_out, "key_cache_out.0")
        g.add_output(value_out, "value_cache_out.0")
        model = lower_paged_attention(g.to_model())
    if scatter_only:  # keep the ScatterND nodes (and what feeds them); outputs: the two pools
        model.graph.outputs.pop(0)
        remove_unused(model)
    return ir.to_proto(model).SerializeToString()


def step_inputs(pool_rows: int, context: int) -> dict[str, np.ndarray]:
    """A decode step of one row whose ``context`` tokens sit in the pool's last pages."""
    rng = np.random.default_rng(0)
    pages = -(-(context + 1) // PAGE_SIZE)
    table = np.arange(pool_rows // PAGE_SIZE - pages, pool_rows // PAGE_SIZE, dtype=np.int32)[None]
    slot = table[0, context // PAGE_SIZE] * PAGE_SIZE + context % PAGE_SIZE
    return {"query": rng.standard_normal((1, 1, HEADS * HEAD_DIM)).astype(np.float32),
            "key": rng.standard_normal((1, 1, KV_HEADS * HEAD_DIM)).astype(np.float32),
            "value": rng.standard_normal((1, 1, KV_HEADS * HEAD_DIM)).astype(np.float32),
            "page_table": table, "slot_mapping": np.array([[slot]], np.int64),
            "cache_lengths": np.array([context], np.int32), "input_lengths": np.array([1], np.int32)}


def time_step(session: ort.InferenceSession, pool_rows: int, context: int, in_place: bool, runs: int) -> float:
    """Median seconds of one run with the pools bound in place (or to separate output buffers)."""
    shape = (pool_rows, KV_HEADS, HEAD_DIM)
    binding = session.io_binding()
    for name, array in step_inputs(pool_rows, context).items():
        binding.bind_cpu_input(name, array)
    outputs = [o.name for o in session.get_outputs()]
    keep = []
    for kind in ("key", "value"):
        pool = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
        out = pool if in_place else ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
        keep += [pool, out]
        binding.bind_ortvalue_input(f"{kind}_cache.0", pool)
        binding.bind_ortvalue_output(f"{kind}_cache_out.0", out)
    if "output" in outputs:
        binding.bind_output("output")
    times = []
    for i in range(runs + 10):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        if i >= 10:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-rows", type=int, nargs="+", default=[1024, 16384, 131072])
    parser.add_argument("--context", type=int, default=512, help="tokens already cached (default 512)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    args = parser.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    sessions = {name: ort.InferenceSession(layer_model(name == "scatter"), options, providers=["CPUExecutionProvider"])
                for name in ("step", "scatter")}
    print(f"onnxruntime {ort.__version__}; one decode step, context {args.context}, page size {PAGE_SIZE}, "
          f"{HEADS} heads / {KV_HEADS} kv heads x {HEAD_DIM}; median of {args.runs} runs")
    print(f"{'pool rows':>10} {'MiB (K+V)':>10} {'in place':>12} {'separate':>12} {'scatter only':>13}")
    for rows in args.pool_rows:
        rows = -(-rows // PAGE_SIZE) * PAGE_SIZE
        mib = 2 * rows * KV_HEADS * HEAD_DIM * 4 / 2 ** 20
        in_place = time_step(sessions["step"], rows, args.context, True, args.runs)
        separate = time_step(sessions["step"], rows, args.context, False, args.runs)
        scatter = time_step(sessions["scatter"], rows, args.context, True, args.runs)
        print(f"{rows:>10} {mib:>10.1f} {in_place * 1e6:>10.1f}us {separate * 1e6:>10.1f}us {scatter * 1e6:>11.1f}us")


if __name__ == "__main__":
    main()
