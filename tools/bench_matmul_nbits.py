"""Time ``MatMulNBits`` against a float32 ``MatMul`` on SmolLM2-135M's layer shapes (CPU EP).

``python -m ember.tools.bench_matmul_nbits [--threads 2] [--repeats 25] [--cpu-time] [--quick]``

Each variant is one single-node model (weights as initializers, so onnxruntime prepacks them) run
with I/O binding; the time per call is the median (and the 10th percentile, a nearly uncontended
figure on a shared machine) over ``--repeats`` timed batches of calls (each about ``--batch-ms``),
the variants of one shape taking turns in a shuffled order. Columns: ``fp32`` MatMul; ``4b``/``8b``
RTN symmetric weights at ``accuracy_level`` 0, 1, 4; ``q41-fzp`` a repacked Q4_1 weight (float zero
points) at level 0; ``q41-split`` the same Q4_1 weight as MatMulNBits with zero point 0 plus a
block-sum MatMul for the minima (:func:`~.matmul_nbits.q4_1_split`) at levels 0 and 4. Also prints
each variant's error against the float32 product of the weight it quantizes (``vs float``) and
against the exact product of its own dequantized weight (``kernel``), as ``max|y - ref| / max|ref|``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort

from ember.compiler.quantization.matmul_nbits import dequantize, from_gguf_blocks, q4_1_split, quantize_rtn
from ember.compiler.quantization.onnx_models import matmul_model, matmul_nbits_model, q4_1_split_model

#: SmolLM2-135M's matmuls as N x K (out x in): fused qkv, attention output, fused gate|up, down, head.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
VARIANTS = ["fp32", "4b-L0", "4b-L1", "4b-L4", "8b-L0", "8b-L1", "8b-L4", "q41-fzp", "q41-split-L0", "q41-split-L4"]


def _session(model, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _bound(sess: ort.InferenceSession, a: np.ndarray, n_out: int):
    binding = sess.io_binding()
    binding.bind_cpu_input("A", a)
    out = ort.OrtValue.ortvalue_from_numpy(np.empty((a.shape[0], n_out), np.float32))
    binding.bind_ortvalue_output("Y", out)
    return binding, out


def time_interleaved(sessions: dict[str, ort.InferenceSession], a: np.ndarray, n_out: int,
                     repeats: int, batch_ms: float, seed: int = 0,
                     clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per ``run_with_iobinding`` call of each session: ``repeats`` samples each, the sessions
    taking turns in a shuffled order every round (so that load from other processes on the shared
    cores spreads over all variants instead of biasing one)."""
    bound = {name: _bound(sess, a, n_out) for name, sess in sessions.items()}
    per_batch = {}
    for name, sess in sessions.items():
        binding = bound[name][0]
        t0 = time.perf_counter()
        calls = 0
        while calls < 3 or time.perf_counter() - t0 < 0.03:  # warm-up, and a first estimate
            sess.run_with_iobinding(binding)
            calls += 1
        per_batch[name] = max(1, int(batch_ms / 1e3 / ((time.perf_counter() - t0) / calls)))
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            run, binding, calls = sessions[name].run_with_iobinding, bound[name][0], per_batch[name]
            t = clock()
            for _ in range(calls):
                run(binding)
            samples[name].append((clock() - t) / calls)
    return samples


def _rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def models_for(n: int, k: int, seed: int = 0) -> dict[str, tuple]:
    """variant -> (model, weight the variant stands for, its own dequantized weight)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    out = {"fp32": (matmul_model(w), w, w)}
    for bits in (4, 8):
        packed = quantize_rtn(w, bits=bits, symmetric=True)
        wq = dequantize(packed)
        for level in (0, 1, 4):
            out[f"{bits}b-L{level}"] = (matmul_nbits_model(packed, level), w, wq)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    packed = from_gguf_blocks(raw, gguf.GGMLQuantizationType.Q4_1, (n, k))
    wq = dequantize(packed)
    out["q41-fzp"] = (matmul_nbits_model(packed, 0), w, wq)
    split, mins = q4_1_split(raw, (n, k))
    for level in (0, 4):
        out[f"q41-split-L{level}"] = (q4_1_split_model(split, mins, level), w, wq)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--batch-ms", type=float, default=5.0)
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, timed by the calling thread's CPU clock (time.thread_time): "
                             "insensitive to other processes taking turns on the cores")
    parser.add_argument("--quick", action="store_true", help="skip the 49152 x 576 output head")
    parser.add_argument("--m", type=int, nargs="*", default=[1, 64], help="rows of A (1: decode, 64: prefill)")
    args = parser.parse_args(argv)
    shapes = SHAPES[:-1] if args.quick else SHAPES
    clock = time.perf_counter
    if args.cpu_time:
        args.threads, clock = 1, time.thread_time
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, {args.repeats} samples per variant; "
          f"microseconds per call{' of CPU time' if args.cpu_time else ''} (load average before: {load})")
    times: dict[tuple, list[float]] = {}
    errors: dict[tuple, tuple[float, float]] = {}
    for n, k in shapes:
        variants = models_for(n, k)
        sessions = {v: _session(model, args.threads) for v, (model, _, _) in variants.items()}
        for m in args.m:
            a = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
            a64 = a.astype(np.float64)
            for v, sess in sessions.items():
                y = sess.run(None, {"A": a})[0].astype(np.float64)
                w, wq = variants[v][1:]
                errors[(n, k, m, v)] = (_rel(y, a64 @ w.T.astype(np.float64)),
                                        _rel(y, a64 @ wq.T.astype(np.float64)))
            for v, samples in time_interleaved(sessions, a, n, args.repeats, args.batch_ms, clock=clock).items():
                times[(n, k, m, v)] = samples
        del sessions, variants
    def p10(xs: list[float]) -> float:
        return float(np.percentile(xs, 10))

    for label, stat in (("median", statistics.median), ("10th percentile", p10)):
        for m in args.m:
            print(f"\nM = {m}, {label}")
            print(f"{'N x K':<11}" + "".join(f"{v:>13}" for v in VARIANTS))
            for n, k in shapes:
                print(f"{f'{n}x{k}':<11}" + "".join(f"{stat(times[(n, k, m, v)]) * 1e6:>13.0f}" for v in VARIANTS))
    print("\nerror max|y - ref| / max|ref|, worst over shapes and M: vs float weight / vs own dequantized weight")
    for v in VARIANTS:
        vs_float = max(errors[key][0] for key in errors if key[3] == v)
        kernel = max(errors[key][1] for key in errors if key[3] == v)
        print(f"{v:<13} {vs_float:10.2e} {kernel:10.2e}")

if __name__ == "__main__":
    main()
