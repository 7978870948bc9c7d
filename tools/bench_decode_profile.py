"""Where a decode step's time goes, op type by op type, in ember and in onnxruntime-genai (issue 15, point 2).

Both run the same workload (``--batch-size`` copies of a ``--prompt-tokens`` prompt, ``--new-tokens`` greedy
tokens, EOS ignored) with onnxruntime's profiler on; from each profile, the decode runs (one token id per row: the
prefills are left out) give per step: the time of each op type's kernels and how many nodes ran, the run
itself (``model_run``), and the host's time between one run's end and the next run's start (scheduling, sampling,
bindings). ember is profiled through a subclass of its CPU backend given to the pipeline registry's backend table;
ort-genai through its decoder's session options.

    python -m ember.tools.bench_decode_profile [MODEL] --encoding q4_0 --batch-size 8 [--compare ort-genai]

BENCHMARKS.md "Batched 4-bit decode" has the table and the command.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ember.runtime.backends import BACKENDS, OrtCpuBackend


@dataclass
class DecodeProfile:
    """Per decode step: milliseconds and node count per op type, the run's median, the host's median gap."""

    name: str
    steps: int
    run_ms: float
    host_ms: float
    ops: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def kernel_ms(self) -> float:
        return sum(ms for ms, _ in self.ops.values())

    @property
    def nodes(self) -> float:
        return sum(count for _, count in self.ops.values())


def _token_shape(node: dict[str, Any]) -> list[int] | None:
    """The shape of a node's first integer input of rank 2 (the token ids ``[batch, sequence]`` for the embedding
    lookup, a graph's first node), if it has one."""
    for typed in node.get("args", {}).get("input_type_shape", []):
        for element, shape in typed.items():
            if element in ("int64", "int32") and len(shape) == 2:
                return list(shape)
    return None


def read_profile(path: str | Path, name: str) -> DecodeProfile:
    """Aggregate an onnxruntime profile (JSON trace) over its decode runs: the runs whose first node that reads
    token ids reads one per row (a prefill, and the pipeline's warm-up calls, read more)."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if not runs:
        raise ValueError(f"{path}: no model_run events (was profiling on?)")
    nodes = sorted((e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    node_starts = np.array([e["ts"] for e in nodes])
    decode, in_run = [], []
    for run in runs:
        first = int(np.searchsorted(node_starts, run["ts"], side="left"))
        last = int(np.searchsorted(node_starts, run["ts"] + run["dur"], side="right"))
        mine = nodes[first:last]
        shape = next((s for s in map(_token_shape, mine) if s is not None), None)
        if shape is not None and shape[1] == 1:
            decode.append(run)
            in_run.append(mine)
    if not decode:
        raise ValueError(f"{path}: no decode run (one token per row) found")
    time_us: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for mine in in_run:
        for event in mine:
            op = event.get("args", {}).get("op_name", "?")
            time_us[op] += event["dur"]
            count[op] += 1
    decode_ids = {id(r) for r in decode}
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(runs, runs[1:])
            if id(a) in decode_ids and id(b) in decode_ids]
    n = len(decode)
    return DecodeProfile(name, n, float(np.median([r["dur"] for r in decode])) / 1000,
                         float(np.median(gaps)) / 1000 if gaps else float("nan"),
                         {op: (time_us[op] / n / 1000, count[op] / n) for op in time_us})


def profiled_cpu_backend(prefix: Path) -> type[OrtCpuBackend]:
    """ember's CPU backend with onnxruntime's profiler on, writing ``<prefix>_<date>.json``."""

    class ProfiledOrtCpuBackend(OrtCpuBackend):
        def session_options(self) -> Any:
            options = super().session_options()
            options.enable_profiling = True
            options.profile_file_prefix = str(prefix)
            return options
    return ProfiledOrtCpuBackend


def profile_ember(model: str | None, encoding: str, batch: int, prompt_tokens: int, new_tokens: int, threads: int,
                  out: Path, kv_cache_strategy: str | None = None) -> tuple[DecodeProfile, Any, Path]:
    """ember's profile, its tokenizer (ort-genai's runs use the same prompt) and its cache folder."""
    from ember.runtime.compile_cache import ensure_artifact
    from ember.runtime.pipelines.architectures import BUILTIN_ARCHITECTURES
    from ember.runtime.pipelines.registry import PipelineRegistry

    from .bench import EmberRunner, prompt_token_ids
    from .loading import LoadedPipeline, pipeline_config

    out.mkdir(parents=True, exist_ok=True)
    backends = {**BACKENDS, OrtCpuBackend.name: profiled_cpu_backend(out / "ember")}
    registry = PipelineRegistry(BUILTIN_ARCHITECTURES, artifacts=ensure_artifact, backends=backends)
    config = pipeline_config(model, encoding=encoding, num_threads=threads, max_batch_size=batch,
                             max_length=prompt_tokens + new_tokens, kv_cache_strategy=kv_cache_strategy,
                             decode_slots=0)  # the named strategy's graph only
    resolved = registry.resolve(config)
    pipeline = registry.build_pipeline(resolved)
    loaded = LoadedPipeline(tokenizer=pipeline.tokenizer, pipeline=pipeline, seconds=0.0, compiled=resolved.compiled,
                            artifact_seconds=resolved.seconds, session_seconds=0.0,
                            artifact_path=Path(resolved.artifact.path), from_cache=True)
    runner = EmberRunner(loaded)
    ids = prompt_token_ids(pipeline.tokenizer, prompt_tokens)
    for _ in range(2):  # the first run warms up
        runner.run(ids, new_tokens, batch)
    path = pipeline.pipeline_model.model.session.end_profiling()
    strategy = resolved.artifact.manifest.get("options", {}).get("kv_cache_strategy", "")
    return read_profile(path, f"ember {encoding} {strategy}".strip()), pipeline.tokenizer, Path(config.cache_dir)


def profile_ort_genai(model: str | None, batch: int, prompt_tokens: int, new_tokens: int, threads: int,
                      out: Path, cache_dir: Path, tokenizer: Any) -> DecodeProfile:
    from .bench import prompt_token_ids
    from .bench_ort_genai import OrtGenaiRunner

    out.mkdir(parents=True, exist_ok=True)
    runner = OrtGenaiRunner(model, threads, cache_dir, progress=False,
                            session_options={"enable_profiling": str(out / "ort-genai")})
    ids = prompt_token_ids(tokenizer, prompt_tokens)
    for _ in range(2):
        runner.run(ids, new_tokens, batch)
    del runner  # the profile is written when the session ends
    import gc

    gc.collect()
    return read_profile(sorted(out.glob("ort-genai*.json"))[-1], "ort-genai int4")


def table(profiles: list[DecodeProfile], top: int = 10) -> str:
    """A markdown table: the op types that take the most time in any profile, then the totals."""
    ops = sorted({op for p in profiles for op in p.ops}, key=lambda op: -max(p.ops.get(op, (0, 0))[0] for p in profiles))
    head = "| per decode step | " + " | ".join(p.name for p in profiles) + " |"
    lines = [head, "| --- |" + " --- |" * len(profiles)]
    for op in ops[:top]:
        cells = [f"{p.ops[op][0]:.2f} ms ({p.ops[op][1]:.0f})" if op in p.ops else "" for p in profiles]
        lines.append(f"| {op} (nodes) | " + " | ".join(cells) + " |")
    rest = ops[top:]
    cells = [f"{sum(p.ops[o][0] for o in rest if o in p.ops):.2f} ms" for p in profiles]
    lines.append("| other ops | " + " | ".join(cells) + " |")
    lines.append("| all kernels (nodes) | " + " | ".join(f"{p.kernel_ms:.2f} ms ({p.nodes:.0f})" for p in profiles) + " |")
    lines.append("| run (`model_run`, median) | " + " | ".join(f"{p.run_ms:.2f} ms" for p in profiles) + " |")
    lines.append("| host between runs (median) | " + " | ".join(f"{p.host_ms:.2f} ms" for p in profiles) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="HF folder or GGUF (default: the embedded SmolLM2)")
    parser.add_argument("--encoding", default="q4_0")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache-strategy", choices=["continuous", "paged"], default=None,
                        help="ember's KV cache (default: the architecture's, as ember bench --batch-size)")
    parser.add_argument("--compare", choices=["ort-genai"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="where the profiles go (default: a temporary folder)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="ember-profile-"))
    ours, tokenizer, cache_dir = profile_ember(args.model, args.encoding, args.batch_size, args.prompt_tokens,
                                               args.new_tokens, args.threads, out, args.kv_cache_strategy)
    profiles = [ours]
    if args.compare == "ort-genai":
        profiles.append(profile_ort_genai(args.model, args.batch_size, args.prompt_tokens, args.new_tokens,
                                          args.threads, out, cache_dir, tokenizer))
    print(f"batch {args.batch_size}, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, {args.threads} threads; "
          f"{ours.steps} decode runs profiled (profiles in {out})\n")
    print(table(profiles))


if __name__ == "__main__":
    main()
