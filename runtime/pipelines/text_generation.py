"""TextGenerationPipeline: the token generator over a decoder PipelineModel (``max.pipelines``' shape).

``next_token(batch, num_steps)`` advances every context by up to ``num_steps`` tokens, each step through the
model runner (``model_runner.py``: execute, sample, log probabilities, append), the same path the engine's
scheduler steps take. :meth:`generate` is the loop a caller usually wants: continuous batching through the
scheduler (runtime/scheduler.py), which admits requests as the KV cache allows (queueing, or preempting when
pages run out, never failing for lack of room), streams each step's tokens and releases finished requests.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from ..kv_cache.continuous import KVCacheExhausted
from .config import PipelineConfig
from .context import FinishReason, SamplingParams, TextContext
from .decoder import DecoderPipelineModel
from .interfaces import ModelInputs
from .model_runner import ModelRunner
from ..speculative.drafters import DraftModelDrafter, Drafter, NgramDrafter
from ..speculative.speculator import SpeculativeConfig, SpeculativeMethod, Speculator

#: A check of a new request (``SupportedArchitecture.context_validators``): raises ValueError with its reason.
ContextValidator = Callable[[TextContext], None]

logger = logging.getLogger(__name__)

#: The prompt tokens :meth:`TextGenerationPipeline.generate` prefills in one step by default (at least one whole
#: prompt): a static batch's prompts go in together, as vLLM's offline engine batches up to 8192 tokens; a prefill
#: of this many tokens keeps its activations to tens of MB per layer for a 4k-wide model.
STATIC_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class TextResponse:
    """One generated token of one request."""

    token: int
    log_probabilities: dict[str, Any] | None = None
    finish_reason: FinishReason | None = None


class TextGenerationPipeline:
    """Generalized token generator."""

    def __init__(self, pipeline_config: PipelineConfig, pipeline_model: DecoderPipelineModel,
                 eos_token_id: int | Iterable[int] | None = None, tokenizer: Any = None,
                 context_validators: Sequence[ContextValidator] = (), draft_model: DecoderPipelineModel | None = None):
        self.pipeline_config = pipeline_config
        self.pipeline_model = pipeline_model
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.eos_token_ids = frozenset(int(i) for i in ids)
        self.tokenizer = tokenizer
        self.context_validators = tuple(context_validators)
        self.runner = ModelRunner(pipeline_model, self._speculator(pipeline_config, pipeline_model, draft_model))

    @staticmethod
    def _speculator(config: PipelineConfig, model: DecoderPipelineModel,
                    draft_model: DecoderPipelineModel | None) -> Speculator | None:
        """The configured speculative decoding (None: plain decoding); a draft model's KV cache is released with
        the target's (a cancelled or preempted request)."""
        if config.speculative is None:
            return None
        speculative = SpeculativeConfig(SpeculativeMethod(config.speculative), config.num_speculative_tokens,
                                        adaptive=config.speculative_adaptive)
        if speculative.method is SpeculativeMethod.draft:
            if draft_model is None:
                raise ValueError("speculative='draft' needs the draft model (PipelineConfig.draft_model_path)")
            if draft_model.vocab_size != model.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft_model.vocab_size} tokens) is not the target "
                                 f"model's ({model.vocab_size}); a draft model must share the tokenizer")
            drafter: Drafter = DraftModelDrafter(draft_model)
        else:
            drafter = NgramDrafter()
        speculator = Speculator(speculative, drafter)
        model.release_listeners.append(speculator.release)
        return speculator

    @property
    def max_length(self) -> int:
        return self.pipeline_model.max_seq_len

    def new_context(self, prompt_tokens: Sequence[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None) -> TextContext:
        """A context for this model (its max length and EOS ids filled in), checked by the architecture's
        context validators: a ValueError with the validator's message if one rejects it."""
        kwargs: dict[str, Any] = {"request_id": request_id} if request_id else {}
        if sampling is not None:
            kwargs["sampling"] = sampling
        vocab = self.pipeline_model.vocab_size
        bad = next((t for t in prompt_tokens if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab), None)
        if bad is not None:  # an embedding lookup out of range is undefined behaviour in the kernel
            raise ValueError(f"prompt token {bad!r} is not a token id of this model (0 <= id < {vocab})")
        context = TextContext(list(prompt_tokens), self.max_length, eos_token_ids=self.eos_token_ids, **kwargs)
        for validate in self.context_validators:
            validate(context)
        return context

    # MAX's pipeline API -------------------------------------------------------------------------
    def calculate_num_steps(self, num_steps: int, context: TextContext) -> int:
        """Steps the context may still take: bounded by the model's length and its max_new_tokens."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        room = context.max_length - context.active_idx
        if room <= 0:
            raise ValueError(f"request {context.request_id} is {context.active_idx} tokens long, at the maximum "
                             f"length {context.max_length}")
        return max(1, min(num_steps, room, context.token_budget))

    def prepare_batch(self, batch: Sequence[TextContext], num_steps: int) -> tuple[ModelInputs, Any, int]:
        """Inputs for one model call over ``batch`` (claiming KV cache for new contexts), its KV cache inputs
        (``ContinuousKVInputs`` / ``PagedKVInputs``) and the steps every context in it can take."""
        num_steps = min(self.calculate_num_steps(num_steps, ctx) for ctx in batch)
        inputs = self.pipeline_model.prepare_initial_token_inputs(batch)
        return inputs, inputs.kv_cache_inputs, num_steps

    def release(self, context: TextContext) -> None:
        """Mark the context complete and free its KV cache slot."""
        if context.finish_reason is None:
            context.finish_reason = FinishReason.STOP
        self.pipeline_model.release(context.request_id)

    def next_token(self, batch: dict[str, TextContext], num_steps: int = 1) -> list[dict[str, TextResponse]]:
        """Run up to ``num_steps`` steps; per step, each still-running request's new token.

        New contexts get their KV cache here (``KVCacheExhausted`` when there is none left: ``next_token`` does
        not queue; :meth:`generate` and the engine do). A context whose prompt's log probabilities are asked
        for computes its prompt a position per step, producing no token until its prompt is done."""
        mismatched = next((key for key, ctx in batch.items() if key != ctx.request_id), None)
        if mismatched is not None:
            raise ValueError(f"batch key {mismatched!r} is not its context's request id "
                             f"{batch[mismatched].request_id!r}")
        contexts = [ctx for ctx in batch.values() if not ctx.is_done]
        if not contexts:
            return []
        num_steps = min(self.calculate_num_steps(num_steps, ctx) for ctx in contexts)
        self._claim_all(contexts)
        steps: list[dict[str, TextResponse]] = []
        for _ in range(num_steps):
            live = [ctx for ctx in contexts if not ctx.is_done]
            if not live:
                break
            rows = [(ctx, min(len(ctx.pending_tokens), ctx.max_chunk or len(ctx.pending_tokens))) for ctx in live]
            results = self.runner.execute(rows)
            steps.extend(_per_token([(r.request_id, TextResponse(r.token, r.log_probabilities, r.finish_reason))
                                     for r in results if r.token is not None]))
        return steps

    def _claim_all(self, contexts: Sequence[TextContext]) -> None:
        """KV cache for every context that has none, or for none of them: a batch larger than the cache claims
        nothing (the KVCacheExhausted names the batch), so no slot or page is left held by a failed call."""
        model = self.pipeline_model
        claimed = []
        try:
            for ctx in contexts:
                if not model.holds(ctx.request_id):
                    model.claim(ctx)
                    claimed.append(ctx)
                elif ctx.start_idx == 0:  # a new context under the id of one that holds cache: not its K/V
                    raise ValueError(f"request id {ctx.request_id!r} is already in use by a running request")
        except (KVCacheExhausted, ValueError) as error:
            for ctx in claimed:
                model.release(ctx.request_id)
                ctx.start_idx = 0
            if isinstance(error, KVCacheExhausted):
                raise KVCacheExhausted(f"a batch of {len(contexts)} requests does not fit the KV cache "
                                       f"({len(claimed)} more could be claimed): {error}") from None
            raise

    # the loop callers want ----------------------------------------------------------------------
    def generate(self, contexts: Iterable[TextContext], num_steps: int = 1,
                 scheduler_config: SchedulerConfig | None = None,
                 on_step: Callable[[SchedulerOutput], None] | None = None) -> Iterator[dict[str, TextResponse]]:
        """Run contexts to completion with continuous batching; yields each step's tokens.

        ``scheduler_config``: by default a step may take a whole prompt, and the prompts of a batch together up to
        :data:`STATIC_BATCH_TOKENS` (a static batch is prefilled in one call and then decodes in step, as in
        transformers or onnxruntime-genai: with a budget of one prompt's length, a batch of eight 64-token prompts
        was prefilled over three steps and its rows finished over three, each an extra model call of a few rows).
        ``on_step`` sees every step's decision after it ran, prompt chunks included (progress)."""
        scheduler = Scheduler(self.pipeline_model, scheduler_config or SchedulerConfig(
            max_num_batched_tokens=max(self.max_length, STATIC_BATCH_TOKENS)))
        for ctx in contexts:
            scheduler.add(ctx)
        try:
            while scheduler.has_unfinished:
                decision = scheduler.schedule()
                outputs = scheduler.update(decision, self.runner.execute(decision.rows))
                if on_step is not None:
                    on_step(decision)
                yield from _per_token([(o.request_id, TextResponse(o.token, o.log_probabilities, o.finish_reason))
                                       for o in outputs if o.token is not None])  # None: the engine's error mark
        finally:
            for request_id in list(scheduler.requests):
                scheduler.abort(request_id)

    def generate_tokens(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None,
                        num_steps: int = 1) -> list[list[int]]:
        """Generated tokens for each prompt (a convenience over :meth:`generate`)."""
        contexts = [self.new_context(p, sampling) for p in prompts]
        for _ in self.generate(contexts, num_steps):
            pass
        return [c.generated for c in contexts]

    def prompt_log_probabilities(self, prompt_tokens: Sequence[int], top_n: int = 0) -> list[dict[str, Any] | None]:
        """The log probability of each prompt token given the ones before it (None for the first), with the
        ``top_n`` most likely alternatives at each position: OpenAI completions' ``echo``. Computed as a
        request with ``prompt_logprobs`` (any artifact; one position per step)."""
        context = self.new_context(prompt_tokens, SamplingParams(max_new_tokens=1, prompt_logprobs=top_n,
                                                                 ignore_eos=True))
        for _ in self.generate([context]):
            pass
        return list(context.prompt_log_probabilities)


def _per_token(outputs: Sequence[tuple[str, TextResponse]]) -> list[dict[str, TextResponse]]:
    """A step's outputs as dicts of one token per request: the i-th dict holds each request's i-th token (a
    speculative step may give a request several; without speculation there is one dict)."""
    steps: list[dict[str, TextResponse]] = []
    seen: dict[str, int] = {}
    for request_id, response in outputs:
        i = seen.get(request_id, 0)
        seen[request_id] = i + 1
        if i == len(steps):
            steps.append({})
        steps[i][request_id] = response
    return steps
