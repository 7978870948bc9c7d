"""What ``ember list`` shows: the supported architectures, their tasks, encodings and KV cache strategies; and the
compile targets, each with its device kind, runtime backend, encodings and KV cache strategies."""
from __future__ import annotations

from typing import Any

from ember.compiler.targets import TARGETS, Target
from ember.runtime.pipelines import PIPELINE_REGISTRY, PipelineRegistry


def _value(item: Any) -> str:
    return str(getattr(item, "value", item))


def describe_architectures(registry: PipelineRegistry = PIPELINE_REGISTRY) -> list[dict[str, Any]]:
    """One plain dict per architecture, sorted by name."""
    rows = []
    for name in registry.supported_names():
        arch = registry.architectures[name]
        rows.append({
            "name": arch.name,
            "task": _value(arch.task),
            "default_encoding": _value(arch.default_encoding),
            "encodings": {_value(e): [_value(s) for s in strategies]
                          for e, strategies in arch.supported_encodings.items()},
            "weights_formats": sorted(_value(f) for f in arch.weight_adapters) or [_value(arch.default_weights_format)],
            "example_repo_ids": list(arch.example_repo_ids),
        })
    return rows


def format_architectures(rows: list[dict[str, Any]]) -> str:
    """A table: one line per architecture, then its example repositories indented below it."""
    headers = ("ARCHITECTURE", "TASK", "ENCODINGS (KV CACHE)", "WEIGHTS")
    table = [(r["name"], r["task"],
              "; ".join(f"{e}{'*' if e == r['default_encoding'] else ''} ({', '.join(s)})"
                        for e, s in r["encodings"].items()),
              ", ".join(r["weights_formats"])) for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(headers)]
    line = "  ".join("{:<%d}" % w for w in widths)
    out = [line.format(*headers).rstrip()]
    for row, cells in zip(rows, table):
        out.append(line.format(*cells).rstrip())
        if row["example_repo_ids"]:
            out.append(f"    examples: {', '.join(row['example_repo_ids'])}")
    out.append("(* default encoding; a model under 1B parameters defaults to float32, exact; a larger GGUF file to its own quantization where listed: q4_1, q4_k, q4_0, q8_0)")
    return "\n".join(out)


def describe_targets(targets: dict[str, Target] = TARGETS) -> list[dict[str, Any]]:
    """One plain dict per compile target, in the table's order (the default first)."""
    return [{"name": t.name, "description": t.description, "device_kind": t.device_kind, "runtime": t.runtime,
             "encodings": list(t.encodings), "kv_cache_strategies": [_value(s) for s in t.kv_strategies]}
            for t in targets.values()]


def format_targets(rows: list[dict[str, Any]]) -> str:
    """A table: one line per target (``--target``), its description indented below it."""
    headers = ("TARGET", "DEVICE", "RUNTIME", "ENCODINGS", "KV CACHE")
    table = [(r["name"], r["device_kind"], r["runtime"], ", ".join(r["encodings"]), ", ".join(r["kv_cache_strategies"]))
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(headers)]
    line = "  ".join("{:<%d}" % w for w in widths)
    out = [line.format(*headers).rstrip()]
    for row, cells in zip(rows, table):
        out.append(line.format(*cells).rstrip())
        out.append(f"    {row['description']}")
    out.append("(an architecture's encoding compiles for the targets that list it; `ember compile --target NAME`)")
    return "\n".join(out)
