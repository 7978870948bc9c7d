"""The decode slots' continuous graph, held in a paged artifact behind one boolean input
(``CompileOptions.slot_graph``).

A paged decoder runs a lone sequence's steps on the continuous graph (GroupQueryAttention over a slot: the paged
graph's step is 1.2x longer at batch 1, BENCHMARKS.md "Paged decode path"); ``runtime/pipelines/decode_slots.py``
decides which steps go where. Both graphs are lowered from the same weights and joined by
:func:`~.graph_switch.switch_graphs`, so one session holds the weights once. The continuous graph's cache inputs
and outputs take the paged graph's names (each branch's binding binds its own buffers to them); the manifest's
``"slot_graph"`` block says how the runtime binds the continuous branch (:func:`slot_graph_manifest`).
"""
from __future__ import annotations

from typing import Any

import onnx_ir as ir

from ember.graphs.nn.kv_cache import KVCacheParams, KVCacheStrategy
from ember.graphs.nn.transformer import ReturnLogits

from .graph_switch import switch_graphs

#: The boolean scalar input that runs the continuous graph (true) or the paged one (false).
SWITCH = "use_slot_graph"


def cache_renames(num_layers: int) -> dict[str, str]:
    """The continuous graph's cache input and output names -> the paged graph's names for the same role."""
    params = {strategy: KVCacheParams(dtype="float32", n_kv_heads=1, head_dim=1, num_layers=num_layers,
                                      cache_strategy=strategy) for strategy in KVCacheStrategy}
    renames: dict[str, str] = {}
    for layer in range(num_layers):
        for names in ("input_names", "output_names"):
            slot = getattr(params[KVCacheStrategy.CONTINUOUS], names)(layer)
            paged = getattr(params[KVCacheStrategy.PAGED], names)(layer)
            renames.update(zip(slot, paged))
    return renames


def attach_slot_graph(paged: ir.Model, continuous: ir.Model, renames: dict[str, str]) -> ir.Model:
    """One model running ``paged``'s graph, or ``continuous``'s when :data:`SWITCH` is true (both lowered);
    ``renames``: :func:`cache_renames`."""
    return switch_graphs(paged, continuous, SWITCH, renames)


def slot_graph_manifest(paged_inputs: list[dict[str, Any]], continuous: dict[str, Any],
                        renames: dict[str, str]) -> dict[str, Any]:
    """The manifest's ``"slot_graph"`` block. ``continuous`` is the continuous graph's described inputs and outputs
    (``compile.describe_graph``), ``paged_inputs`` the paged graph's inputs, ``renames`` :func:`cache_renames`'.
    It holds the switch, the renames, what the continuous branch's manifest differs in (``"manifest"``: strategy,
    logits, graph) and the inputs only the paged branch reads (``"idle_inputs"``: a binding of the continuous
    branch binds placeholders to them)."""
    read = {renames.get(value["name"], value["name"]) for value in continuous["inputs"]}
    idle = [{"name": value["name"], "dtype": ir.DataType[value["dtype"]].numpy().name, "rank": len(value["shape"])}
            for value in paged_inputs if value["name"] not in read]
    return {"switch": SWITCH, "renames": renames, "idle_inputs": idle,
            "manifest": {"kv_cache_strategy": KVCacheStrategy.CONTINUOUS.value,
                         "return_logits": ReturnLogits.LAST_TOKEN.value, "graph": continuous}}
