"""Decode slots of a paged decoder: steps that fit run on the same model compiled with the continuous cache.

The paged decoder (:class:`~.decoder.DecoderPipelineModel` with a PAGED cache) gets :class:`DecodeSlots` from
``PipelineConfig(decode_slots=N)``: its artifact then holds the continuous graph too, behind a switch input
(``compiler/slot_graph.py``), and the slots' decoder is a second binding of the same loaded model
(:func:`slot_branch`): one session, the weights loaded once.
A step whose rows all hold or can get one of the N slots, and that GroupQueryAttention runs in one call (decode rows,
fresh prompts, or one row extending its cache), runs there; any other step runs the paged graph after the slots'
tokens are written back to the pages. The bookkeeping of who holds which tokens where is
:class:`~ember.runtime.kv_cache.slot_mirror.SlotMirror`'s; this module decides which steps go where and runs them.

A lone request's prompt runs in its slot too, so that at concurrency 1 only the slots' session runs: with the prompt
on the paged session and the decode steps on the slots', each session found the other's onnxruntime threads still
spinning (time to first token 23 -> 33-54 ms for SmolLM2 q4_0; BENCHMARKS.md "Decode slots").
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from ember.graphs.nn.transformer import ReturnLogits

from ..backends.base import LoadedModel
from ..kv_cache.continuous import ContinuousKVCacheManager
from ..kv_cache.paged import PagedKVCacheManager
from ..kv_cache.slot_mirror import SlotMirror
from .decoder_inputs import DecoderInputs
from .interfaces import ModelOutputs
from .kv_binding import ContinuousBinding, PagedBinding, batch_mode


_SWITCH = {False: np.array(False), True: np.array(True)}
_PLACEHOLDERS: dict[tuple[str, int], np.ndarray] = {}  # bound once per binding: kept alive here


def bind_paged_branch(model: LoadedModel, manifest: dict) -> None:
    """Make a loaded paged model whose artifact holds the slots' graph run its paged graph."""
    model.bind_input(manifest["slot_graph"]["switch"], _SWITCH[False])


def slot_branch(model: LoadedModel, manifest: dict) -> LoadedModel:
    """A second binding of the loaded paged ``model`` that runs the slots' continuous graph: the continuous
    graph's names bound as the switched model's, and a placeholder for each input only the paged graph reads."""
    block = manifest["slot_graph"]
    fork = model.fork(block["renames"])
    fork.bind_input(block["switch"], _SWITCH[True])
    for idle in block["idle_inputs"]:
        key = (idle["dtype"], int(idle["rank"]))
        if key not in _PLACEHOLDERS:
            _PLACEHOLDERS[key] = np.zeros((1,) * key[1], np.dtype(key[0]))
        fork.bind_input(idle["name"], _PLACEHOLDERS[key])
    return fork


class SlotDecoder(Protocol):
    """What decode slots need of the decoder that runs them: a :class:`~.decoder.DecoderPipelineModel` compiled with
    the continuous cache (a protocol, so that this module and the decoder do not import each other)."""

    vocab_size: int
    kv_manager: ContinuousKVCacheManager | PagedKVCacheManager
    kv: ContinuousBinding | PagedBinding

    def execute(self, model_inputs: DecoderInputs, commit: bool = True) -> ModelOutputs: ...


class DecodeSlots:
    """The slots of one paged decoder (see the module docstring); ``steps`` counts the steps run in them."""

    def __init__(self, pages: PagedKVCacheManager, slot_model: SlotDecoder, vocab_size: int,
                 return_logits: ReturnLogits):
        manager, binding = slot_model.kv_manager, slot_model.kv
        if not isinstance(manager, ContinuousKVCacheManager) or not isinstance(binding, ContinuousBinding):
            raise ValueError("the decode slots' model must have a continuous KV cache")
        if slot_model.vocab_size != vocab_size:
            raise ValueError(f"the decode slots' model has {slot_model.vocab_size} logits, the paged one {vocab_size}")
        self.model, self.binding = slot_model, binding
        self.mirror = SlotMirror(pages, manager)
        self.return_logits = return_logits  # the paged decoder's: what its callers expect back
        self.steps = 0

    def fits(self, inputs: DecoderInputs) -> bool:
        """Whether the step can run in the slots: every row has tokens, holds or can get a slot, and the continuous
        graph runs the mix in one call (with every position's logits asked for, one-token rows only)."""
        ids = inputs.request_ids
        return (bool(inputs.input_lengths.all()) and self.mirror.can_take(ids)
                and batch_mode(inputs.input_lengths, inputs.cache_lengths) is not None and (inputs.tokens.shape[1] == 1 or self.return_logits is ReturnLogits.LAST_TOKEN))

    def execute(self, inputs: DecoderInputs) -> ModelOutputs:
        """Run a step that :meth:`fits` in the slots, committed in them; the caller commits it to the paged cache's
        bookkeeping (its K/V reach the pages when the mirror flushes)."""
        ids = inputs.request_ids
        self.mirror.prepare(ids)
        order, slot_inputs = self.binding.order(list(ids))
        rows = [ids.index(r) for r in order]
        outputs = self.model.execute(dataclasses.replace(
            inputs, tokens=inputs.tokens[rows], input_lengths=inputs.input_lengths[rows],
            cache_lengths=inputs.cache_lengths[rows], request_ids=order, kv_cache_inputs=slot_inputs))
        logits = outputs.next_token_logits
        assert logits is not None  # a decoder's call always gives next-token logits
        if rows != sorted(rows):
            in_order = np.empty_like(logits)
            in_order[rows] = logits
            logits = in_order
        self.steps += 1
        if self.return_logits is ReturnLogits.ALL:  # one-token rows (see fits): their one position
            return ModelOutputs(next_token_logits=logits, logits=logits[:, None])
        return ModelOutputs(next_token_logits=logits)

    def before_paged_step(self) -> None:
        """The paged graph reads pages: the slots' tokens go there first."""
        self.mirror.flush()

    def after_paged_step(self, request_ids: list[str]) -> None:
        self.mirror.paged_step_done(request_ids)

    def release(self, request_id: str) -> None:
        """Before the request's pages are released: its slot's tokens into them (cached pages keep them), slot freed."""
        self.mirror.release(request_id)
