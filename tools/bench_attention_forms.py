"""Time one decode step's attention alone, in the two forms ember's ort-cpu target lowers it to.

Why: at batch 1 a paged decode step through the runtime is ~1.2x the continuous one (BENCHMARKS.md "Paged decode
path"), and the paged graph has three times the nodes. This tool separates what the attention ops themselves cost
from the rest of the step: a graph of ``--layers`` attention ops only (SmolLM2-135M's heads by default), each
layer's output the next layer's query, in

- ``paged``: ``ember.PagedAttention`` lowered by ``lower_paged_attention`` (RotaryEmbedding, ScatterND into the pool,
  Gather through the page table, explicit grouped attention: what the engine runs), pools bound in place;
- ``continuous``: ``ember.CachedAttention`` lowered by ``lower_attention_to_gqa`` (one GroupQueryAttention per
  layer, rotary inside it, the slot updated in place).

Both run one decode token per row at ``--context`` cached tokens (pages shuffled in the pool); the forms take turns
round by round and the median of the rounds is reported, with the ratio to ``continuous``. Before timing, both
forms' outputs are checked to agree (so a timing is never of a wrong graph).

    python -m ember.tools.bench_attention_forms --batch 1 16 --context 128 512 --threads 2
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ember.compiler.passes.lower_attention_gqa import lower_attention_to_gqa
from ember.compiler.passes.lower_paged_attention import lower_paged_attention
from ember.graphs.ir.custom import attention, paged_attention
from ember.graphs.ir.graph import Graph
from ember.graphs.nn.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)

F32, I32, I64 = ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.INT64


@dataclass(frozen=True)
class Shape:
    """The attention's heads and the step: ``batch`` rows, one new token each after ``context`` cached ones."""

    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    layers: int = 30
    page_size: int = 16
    batch: int = 1
    context: int = 128

    @property
    def pages_per_row(self) -> int:
        return -(-(self.context + 1) // self.page_size)


@dataclass(frozen=True)
class FormTime:
    """One form's median milliseconds per step, its lowered graph's node count (before onnxruntime's own
    optimizations), and its time's ratio to the continuous form's."""

    form: str
    ms: float
    nodes: int
    ratio: float


def build(shape: Shape, form: str) -> ir.Model:
    """The lowered ``form`` graph: inputs query/key/value, lengths, its caches (``cache.{i}``-named per form)."""
    s = shape
    with Graph(f"attention_{form}") as g:
        x = g.add_input("query", F32, [s.batch, 1, s.heads * s.head_dim])
        key = g.add_input("key", F32, [s.batch, 1, s.kv_heads * s.head_dim])
        value = g.add_input("value", F32, [s.batch, 1, s.kv_heads * s.head_dim])
        cache_lengths = g.add_input("cache_lengths", I32, [s.batch])
        input_lengths = g.add_input("input_lengths", I32, [s.batch])
        tables = RotaryEmbedding(s.head_dim, 10000.0, s.context + 2).tables()
        cos, sin = (g.add_constant(t, n) for t, n in zip(tables, ("rotary.cos", "rotary.sin")))
        if form == "paged":
            page_table = g.add_input("page_table", I32, [s.batch, s.pages_per_row])
            slot_mapping = g.add_input("slot_mapping", I64, [s.batch, 1])
        for i in range(s.layers):
            # paged: a pool of token rows; continuous: a slot per row, one position past the context
            dims: list[int | str | None] = (["pool_rows", s.kv_heads, s.head_dim] if form == "paged"
                                            else [s.batch, s.kv_heads, s.context + 1, s.head_dim])
            key_cache, value_cache = (g.add_input(f"{w}_cache.{i}", F32, dims) for w in ("key", "value"))
            if form == "paged":
                x, key_out, value_out = paged_attention(
                    x, key, value, key_cache, value_cache, page_table, slot_mapping, cache_lengths, input_lengths,
                    cos, sin, num_heads=s.heads, kv_num_heads=s.kv_heads, page_size=s.page_size)
            else:
                x, key_out, value_out = attention(x, key, value, key_cache, value_cache, cache_lengths, input_lengths,
                                                  cos, sin, num_heads=s.heads, kv_num_heads=s.kv_heads)
            g.add_output(key_out, f"key_cache_out.{i}")
            g.add_output(value_out, f"value_cache_out.{i}")
        g.add_output(x, "output")
        model = g.to_model()
    return lower_paged_attention(model) if form == "paged" else lower_attention_to_gqa(model)


class FormRunner:
    """A form's session with its inputs and caches bound once (caches as input and output, as the runtime does)."""

    def __init__(self, shape: Shape, form: str, threads: int, seed: int = 0):
        s = shape
        model = build(shape, form)
        self.nodes = len(list(model.graph))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(seed)
        inputs = {"query": rng.standard_normal((s.batch, 1, s.heads * s.head_dim), np.float32),
                  "key": rng.standard_normal((s.batch, 1, s.kv_heads * s.head_dim), np.float32),
                  "value": rng.standard_normal((s.batch, 1, s.kv_heads * s.head_dim), np.float32),
                  "cache_lengths": np.full(s.batch, s.context, np.int32),
                  "input_lengths": np.ones(s.batch, np.int32)}
        # The same cached K/V for both forms: [batch, kv, context, hd] per layer, written into each form's layout.
        cached = [[rng.standard_normal((s.batch, s.kv_heads, s.context, s.head_dim), np.float32) for _ in "kv"]
                  for _ in range(s.layers)]
        self._arrays: list[np.ndarray] = []
        if form == "paged":
            pages = np.random.default_rng(seed + 1).permutation(np.arange(1, 1 + s.batch * s.pages_per_row))
            table = pages.reshape(s.batch, s.pages_per_row).astype(np.int32)
            rows = (table[:, :, None].astype(np.int64) * s.page_size + np.arange(s.page_size)).reshape(s.batch, -1)
            inputs["page_table"] = table
            inputs["slot_mapping"] = rows[:, s.context:s.context + 1].copy()
            pool_rows = (1 + s.batch * s.pages_per_row) * s.page_size
            for layer in cached:
                for kv in layer:
                    pool = np.zeros((pool_rows, s.kv_heads, s.head_dim), np.float32)
                    pool[rows[:, :s.context]] = kv.transpose(0, 2, 1, 3)
                    self._arrays.append(pool)
        else:
            for layer in cached:
                for kv in layer:
                    slot = np.zeros((s.batch, s.kv_heads, s.context + 1, s.head_dim), np.float32)
                    slot[:, :, :s.context] = kv
                    self._arrays.append(slot)
        self.binding = self.session.io_binding()
        for name, array in inputs.items():
            self.binding.bind_cpu_input(name, array)
        self._values = [ort.OrtValue.ortvalue_from_numpy(array) for array in self._arrays]  # outlive the binding
        for i, value in enumerate(self._values):
            which = "key" if i % 2 == 0 else "value"
            self.binding.bind_ortvalue_input(f"{which}_cache.{i // 2}", value)
            self.binding.bind_ortvalue_output(f"{which}_cache_out.{i // 2}", value)
        self.binding.bind_output("output")

    def run(self) -> np.ndarray:
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[-1].numpy()

    def time(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - start) / steps


FORMS = ("continuous", "paged")


def measure(shape: Shape, threads: int, rounds: int = 5, steps: int = 50) -> list[FormTime]:
    """Both forms at ``shape``: checked to agree, then timed in turns; ratios to ``continuous``."""
    runners = {form: FormRunner(shape, form, threads) for form in FORMS}
    # Every run writes the same new token at the same position, so repeated runs give the same output.
    outputs = {form: runner.run() for form, runner in runners.items()}
    np.testing.assert_allclose(outputs["paged"], outputs["continuous"], rtol=1e-4, atol=1e-4)
    times: dict[str, list[float]] = {form: [] for form in FORMS}
    for r in range(rounds):
        for form in FORMS[r % 2:] + FORMS[:r % 2]:
            runners[form].time(max(steps // 10, 1))  # onnxruntime's threads back on this session
            times[form].append(runners[form].time(steps))
    base = statistics.median(times["continuous"])
    return [FormTime(form, statistics.median(times[form]) * 1e3, runners[form].nodes,
                     statistics.median(times[form]) / base) for form in FORMS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--context", type=int, nargs="+", default=[128], help="cached tokens per row")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="runs per round")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("attention alone, %d layers of %d/%d heads x %d, %d threads, median of %d rounds of %d runs",
                args.layers, args.heads, args.kv_heads, args.head_dim, args.threads, args.rounds, args.steps)
    for batch in args.batch:
        for context in args.context:
            shape = Shape(args.heads, args.kv_heads, args.head_dim, args.layers, batch=batch, context=context)
            for result in measure(shape, args.threads, args.rounds, args.steps):
                logger.info("batch %3d  context %5d  %-10s %8.3f ms/step  x%.3f  %4d nodes", batch, context,
                            result.form, result.ms, result.ratio, result.nodes)


if __name__ == "__main__":
    main()
