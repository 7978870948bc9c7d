"""What ``ember compile -v`` says about lowering: each form chosen, for how many nodes, and why not a preferred one.

The manifest keeps one record per node (``"lowerings"``: node, op, form, rejected forms with reasons); layers
usually share their shapes, so the report groups identical decisions and names the first node of each group.
"""
from __future__ import annotations

from collections import Counter


def format_lowerings(manifest: dict) -> list[str]:
    """One line per distinct (op, form, reasons): ``CachedAttention -> <form>: 30 nodes (<reasons>)``."""
    groups: Counter = Counter()
    first: dict[tuple, str] = {}
    for record in manifest.get("lowerings", []):
        key = (record["op"], record["form"], tuple(record.get("rejected", ())))
        groups[key] += 1
        first.setdefault(key, record["node"])
    lines = []
    for (op, form, rejected), count in groups.items():
        nodes = f"{count} node{'s' if count != 1 else ''}, e.g. {first[(op, form, rejected)]}"
        why = f"; not {'; not '.join(rejected)}" if rejected else ""
        lines.append(f"{op} -> {form}: {nodes}{why}")
    return lines or ["no lowering decisions recorded (an artifact from before ember recorded them)"]
