"""TextGenerationPipeline: the token generator over a decoder PipelineModel (``max.pipelines``' shape).

``next_token(batch, num_steps)`` advances every context by up to ``num_steps`` tokens: new prompts are
prefilled (in as few calls as the KV strategy allows), contexts already decoding take their step, then the
whole batch decodes together for the remaining steps, preparing each step's inputs from the last ones
(no per-step regrouping). :meth:`generate` is the loop a caller usually wants: continuous batching through
the scheduler (runtime/scheduler.py), which admits requests as the KV cache allows (queueing, or
preempting when pages run out, never failing for lack of room), streams each step's tokens and releases
finished requests.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .config import PipelineConfig
from .context import FinishReason, TextContext
from .decoder import DecoderPipelineModel
from .interfaces import ModelInputs
from .sampling import sample_contexts


def scheduler_finish(output) -> FinishReason | None:
    reason = output.finish_reason
    return reason if reason is None or isinstance(reason, FinishReason) else FinishReason(reason)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextResponse:
    """One generated token of one request."""

    token: int
    log_probabilities: dict[str, Any] | None = None
    finish_reason: FinishReason | None = None


class TextGenerationPipeline:
    """Generalized token generator."""

    def __init__(self, pipeline_config: PipelineConfig, pipeline_model: DecoderPipelineModel,
                 eos_token_id: int | Iterable[int] | None = None, tokenizer: Any = None):
        self.pipeline_config = pipeline_config
        self.pipeline_model = pipeline_model
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.eos_token_ids = frozenset(int(i) for i in ids)
        self.tokenizer = tokenizer

    @property
    def max_length(self) -> int:
        return self.pipeline_model.max_seq_len

    def new_context(self, prompt_tokens: Sequence[int], sampling=None, request_id: str | None = None) -> TextContext:
        """A context for this model: its max length and EOS ids filled in."""
        kwargs = {"request_id": request_id} if request_id else {}
        if sampling is not None:
            kwargs["sampling"] = sampling
        return TextContext(list(prompt_tokens), self.max_length, eos_token_ids=self.eos_token_ids, **kwargs)

    # MAX's pipeline API -------------------------------------------------------------------------
    def calculate_num_steps(self, num_steps: int, context: TextContext) -> int:
        """Steps the context may still take: bounded by the model's length and its max_new_tokens."""
        room = context.max_length - context.active_idx
        if room <= 0:
            raise ValueError(f"request {context.request_id} is {context.active_idx} tokens long, at the maximum "
                             f"length {context.max_length}")
        return max(1, min(num_steps, room, context.token_budget))

    def prepare_batch(self, batch: Sequence[TextContext], num_steps: int) -> tuple[ModelInputs, Any, int]:
        """Inputs for one model call over ``batch`` and the steps every context in it can take."""
        num_steps = min(self.calculate_num_steps(num_steps, ctx) for ctx in batch)
        inputs = self.pipeline_model.prepare_initial_token_inputs(batch)
        return inputs, inputs.kv_cache_inputs, num_steps

    def release(self, context: TextContext) -> None:
        """Mark the context complete and free its KV cache slot."""
        if context.finish_reason is None:
            context.finish_reason = FinishReason.STOP
        self.pipeline_model.release(context.request_id)

    def next_token(self, batch: dict[str, TextContext], num_steps: int = 1) -> list[dict[str, TextResponse]]:
        """Run up to ``num_steps`` steps; per step, each still-running request's new token."""
        contexts = [ctx for ctx in batch.values() if not ctx.is_done]
        if not contexts:
            return []
        num_steps = min(self.calculate_num_steps(num_steps, ctx) for ctx in contexts)
        steps: list[dict[str, TextResponse]] = [{} for _ in range(num_steps)]

        # Step 0: each group the attention kernel can run in one call.
        last_inputs = None
        for group in self._groups(contexts):
            inputs, _, _ = self.prepare_batch(group, 1)
            last_inputs = self._run_step(inputs, {c.request_id: c for c in group}, steps[0])
        # Later steps: the whole batch, one token per row. The KV cache room for all of them is taken once
        # here (pages, for a paged cache), so a step's bookkeeping is only its slot mapping.
        if num_steps > 1:
            for ctx in contexts:
                self.pipeline_model.reserve(ctx, num_steps - 1)
            inputs = self.pipeline_model.prepare_initial_token_inputs(contexts)
            by_id = {c.request_id: c for c in contexts}
            for step in range(1, num_steps):
                if all(c.is_done for c in contexts):
                    break
                last_inputs = self._run_step(inputs, by_id, steps[step])
                inputs = self.pipeline_model.prepare_next_token_inputs(last_inputs[1], inputs)
        return [s for s in steps if s]

    def _groups(self, contexts: list[TextContext]) -> list[list[TextContext]]:
        rows = [(c, len(c.pending_tokens)) for c in contexts]
        return [[contexts[i] for i in group] for group in self.pipeline_model.kv.groups(rows)]

    def _run_step(self, inputs, by_id: dict[str, TextContext], out: dict[str, TextResponse]):
        outputs = self.pipeline_model.execute(inputs)
        contexts = [by_id[r] for r in inputs.request_ids]
        tokens = sample_contexts(outputs.next_token_logits, contexts)
        top_n = [c.sampling.top_logprobs for c in contexts]
        logprobs = (self.pipeline_model.compute_log_probabilities(inputs, outputs, tokens, top_n,
                                                                 [False] * len(contexts))
                    if any(top_n) else [None] * len(contexts))
        for ctx, token, lp in zip(contexts, tokens, logprobs):
            if ctx.is_done:
                continue  # finished earlier in this call; its row ran only to keep the batch whole
            ctx.start_idx = ctx.active_idx
            ctx.append(int(token))
            out[ctx.request_id] = TextResponse(int(token), lp, ctx.finish_reason)
        return inputs, tokens

    # the loop callers want ----------------------------------------------------------------------
    def generate(self, contexts: Iterable[TextContext], num_steps: int = 1,
                 scheduler_config: Any = None) -> Iterator[dict[str, TextResponse]]:
        """Run contexts to completion with continuous batching; yields each step's tokens.

        ``scheduler_config`` (a :class:`~ember.runtime.scheduler.SchedulerConfig`): by default a step may
        take a whole prompt (no chunking: nothing else is waiting for it here)."""
        from ..scheduler import Scheduler, SchedulerConfig

        config = scheduler_config or SchedulerConfig(max_num_batched_tokens=self.max_length)
        scheduler = Scheduler(self.pipeline_model, config)
        for ctx in contexts:
            scheduler.add(ctx)
        try:
            while scheduler.has_unfinished:
                outputs = scheduler.step()
                if outputs:
                    yield {o.request_id: TextResponse(o.token, o.log_probabilities, scheduler_finish(o)) for o in outputs}
        finally:
            for request_id in list(scheduler.requests):
                scheduler.abort(request_id)

    def generate_tokens(self, prompts: Sequence[Sequence[int]], sampling=None, num_steps: int = 1) -> list[list[int]]:
        """Generated tokens for each prompt (a convenience over :meth:`generate`)."""
        contexts = [self.new_context(p, sampling) for p in prompts]
        for _ in self.generate(contexts, num_steps):
            pass
        return [c.generated for c in contexts]

