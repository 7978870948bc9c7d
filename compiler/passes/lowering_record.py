"""Which lowering each node got, and why the preferred ones were rejected: kept on the model, written to the manifest.

Kernels have limits (GroupQueryAttention's head sizes, MatMulNBits' block layout, ...). A lowering that targets
such a kernel declares its limits as a *rejection check*: a function of the node that returns the reason the
kernel cannot take it, or ``None``. When a node is rejected, the next lowering in the target's order is tried;
every decision is recorded here (``ember compile -v`` prints them, the manifest keeps them under
``"lowerings"``), so a model is refused only at compile time, with the limits that refused it, and never by a
kernel at run time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx_ir as ir

from ember.graphs.ir.custom.collectives import COLLECTIVE_OPS

from ember.graphs.ir.versions import EMBER_DOMAIN

LOWERINGS_META = "ember.lowerings"


@dataclass(frozen=True)
class Lowering:
    """One node's lowering: the high-level ``op`` it was, the ``form`` it became, and why not a preferred form."""

    node: str
    op: str
    form: str
    rejected: tuple[str, ...] = ()  # "<form>: <reason>" for each preferred form that could not take the node

    def to_json(self) -> dict:
        data = asdict(self)
        data["rejected"] = list(self.rejected)
        return data

    def describe(self) -> str:
        why = f" ({'; '.join(self.rejected)})" if self.rejected else ""
        return f"{self.node}: {self.op} -> {self.form}{why}"


def record_lowering(model: ir.Model, lowering: Lowering) -> None:
    """Append ``lowering`` to the model's record (kept in ``model.meta``, which ONNX files do not store)."""
    records = model.meta.get(LOWERINGS_META)
    if records is None:
        records = []
        model.meta[LOWERINGS_META] = records
    records.append(lowering)


def recorded_lowerings(model: ir.Model) -> list[Lowering]:
    """The lowerings recorded so far, in the order they were made."""
    return list(model.meta.get(LOWERINGS_META) or [])


def record_rejection(model: ir.Model, node: ir.Node, form: str, reason: str) -> None:
    """Note that ``form`` cannot take ``node`` (the node stays for the next lowering to take)."""
    record_lowering(model, Lowering(node.name or "", node.op_type, "", (f"{form}: {reason}",)))


def summarize(model: ir.Model) -> list[Lowering]:
    """One record per node: its final form with every rejection before it. Nodes still without a form (every
    lowering rejected them) keep ``form == ""``."""
    merged: dict[str, Lowering] = {}
    for lowering in recorded_lowerings(model):
        before = merged.get(lowering.node)
        rejected = (before.rejected if before else ()) + lowering.rejected
        form = lowering.form or (before.form if before else "")
        merged[lowering.node] = Lowering(lowering.node, lowering.op, form, rejected)
    return list(merged.values())


def refuse_unlowered(model: ir.Model, target: str) -> None:
    """A ValueError naming every ``ember`` op that no lowering of ``target`` took, with the limits that refused it.
    Collectives are left for the compiler's cut into stages (``cut_at_collectives``), which the runtime runs with
    its communicator between them."""
    left = [node for node in model.graph if node.domain == EMBER_DOMAIN and node.op_type not in COLLECTIVE_OPS]
    if not left:
        return
    reasons = {lowering.node: lowering.rejected for lowering in summarize(model)}
    lines = [f"{node.name} ({node.op_type}): " + ("; ".join(reasons.get(node.name or "", ())) or "no lowering")
             for node in left[:4]]
    more = f" (and {len(left) - 4} more)" if len(left) > 4 else ""
    raise ValueError(f"target {target} cannot run this model: no lowering accepts {len(left)} node(s){more}: "
                     + " | ".join(lines))
