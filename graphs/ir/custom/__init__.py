"""The ``ember`` custom-op domain: each op's ONNX schema, emitter and numpy reference implementation.

Importing this package registers the schemas with ``onnx.defs`` so that ``onnx.checker`` and shape
inference know the ops. :func:`reference_evaluator_ops` gives the op classes for
``onnx.reference.ReferenceEvaluator``, which runs a high-level (not yet lowered) graph.
"""
from __future__ import annotations

import onnx.defs
from onnx.reference.op_run import OpRun

from . import attention as _attention
from . import collectives as _collectives
from . import paged_attention as _paged_attention
from .attention import attention, attention_reference
from .collectives import all_gather, all_gather_reference, all_reduce, all_reduce_reference
from .paged_attention import paged_attention, paged_attention_reference

SCHEMAS = [_attention.SCHEMA, _paged_attention.SCHEMA, *_collectives.SCHEMAS]

for _schema in SCHEMAS:
    if not onnx.defs.has(_schema.name, _schema.domain):
        onnx.defs.register_schema(_schema)


class _AttentionOp(OpRun):
    op_domain = "ember"

    def _run(self, *inputs, **attributes):  # the node's attributes, named as the reference's keywords
        return attention_reference(*inputs, **attributes)


_AttentionOp.__name__ = "CachedAttention"


class _PagedAttentionOp(OpRun):
    op_domain = "ember"

    def _run(self, *inputs, **attributes):
        return paged_attention_reference(*inputs, **attributes)


_PagedAttentionOp.__name__ = "PagedAttention"


def reference_evaluator_ops() -> list[type[OpRun]]:
    """``new_ops`` for ``onnx.reference.ReferenceEvaluator`` covering every single-graph ember op (a collective's
    meaning needs every rank's input: :mod:`.collectives` has their references, over a list of rank inputs)."""
    return [_AttentionOp, _PagedAttentionOp]


__all__ = ["SCHEMAS", "all_gather", "all_gather_reference", "all_reduce", "all_reduce_reference", "attention",
           "attention_reference", "paged_attention", "paged_attention_reference", "reference_evaluator_ops"]
