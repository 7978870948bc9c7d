"""Continuous batching: which requests run in the next model step, and with how many tokens.

Each step has a token budget (``max_num_batched_tokens``). Running requests go first, oldest first: a
decoding request costs one token; a request still in its prompt takes what is left of its prompt, cut to
the budget when chunked prefill is on, so that a long prompt is prefilled over several steps while the
running decodes keep producing a token every step. Waiting requests are admitted after them, in arrival
order, while the budget, the batch limit and the KV cache allow (``PipelineModel.admit`` may serve part of
a prompt from the prefix cache). Requests join and leave between steps.

When the KV cache cannot hold a running request's next tokens, the newest running request is preempted:
its KV cache is released and it goes back to the front of the queue, to be recomputed from its tokens
(prompt and everything generated so far) later; nothing fails. Cancelling a request frees its cache at
once.

The scheduler only decides; :meth:`Scheduler.step` runs the decision on the model
(``execute_rows``), samples each row that reached the end of its known tokens, and applies stop rules.
"""
from __future__ import annotations

import enum
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .pipelines.context import FinishReason, TextContext
from .pipelines.sampling import log_softmax, sample_contexts

logger = logging.getLogger(__name__)


class SchedulableModel(Protocol):
    """What the scheduler needs of a pipeline model (``DecoderPipelineModel`` implements it)."""

    max_batch_size: int

    def admit(self, context: TextContext) -> bool: ...

    def reserve(self, context: TextContext, num_tokens: int) -> bool: ...

    def release(self, request_id: str) -> None: ...

    def execute_rows(self, rows: Sequence[tuple[TextContext, int]]) -> np.ndarray: ...


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class AbortReason(str, enum.Enum):
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_num_seqs``: requests per step (default: the model's batch limit); ``max_num_batched_tokens``:
    the step's token budget; ``enable_chunked_prefill``: cut prompts to the budget (else a prompt runs
    whole, alone if it exceeds the budget)."""

    max_num_seqs: int | None = None
    max_num_batched_tokens: int = 256
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")


@dataclass(eq=False)
class Request:
    """A context and its place in the scheduler."""

    context: TextContext
    arrival: int
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    aborted: AbortReason | None = None

    @property
    def request_id(self) -> str:
        return self.context.request_id

    @property
    def num_pending(self) -> int:
        """Tokens known but not yet in the KV cache (the prompt at first, then the last sampled token)."""
        return self.context.active_idx - self.context.start_idx


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request: a new token (None for a prompt chunk) and whether it ended."""

    request_id: str
    token: int | None
    finish_reason: FinishReason | str | None = None
    log_probabilities: dict[str, Any] | None = None  # when the request's sampling asks for top_logprobs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    scheduled_tokens: int = 0
    prompt_chunks: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class Scheduler:
    """Continuous batching over one model; see the module docstring for the policy."""

    def __init__(self, model: SchedulableModel, config: SchedulerConfig | None = None):
        self.model = model
        self.config = config or SchedulerConfig()
        self.max_num_seqs = min(self.config.max_num_seqs or model.max_batch_size, model.max_batch_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._arrivals = itertools.count()

    # requests -----------------------------------------------------------------------------------
    def add(self, context: TextContext) -> Request:
        if context.request_id in self.requests:
            raise ValueError(f"request {context.request_id} is already scheduled")
        if context.is_done:
            raise ValueError(f"request {context.request_id} is already finished")
        request = Request(context, next(self._arrivals))
        self.requests[request.request_id] = request
        self.waiting.append(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Cancel a request: its KV cache is freed now. False if it is unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self.model.release(request_id)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status, request.aborted = RequestStatus.FINISHED, AbortReason.CANCELLED
        return True

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # scheduling ---------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Request, int]]:
        """This step's rows: ``(request, tokens to compute)``, running requests first."""
        budget = self.config.max_num_batched_tokens
        rows: list[tuple[Request, int]] = []
        scheduled: set[int] = set()
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            count = self._token_count(request, budget, bool(rows))
            if count == 0:
                continue
            while not self.model.reserve(request.context, count):
                victim = self._preemption_victim(scheduled)
                self._preempt(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue
            rows.append((request, count))
            scheduled.add(id(request))
            budget -= count
            if budget == 0:
                break
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if not self.model.admit(request.context):
                break
            count = self._token_count(request, budget, bool(rows))
            if count == 0 or not self.model.reserve(request.context, count):
                self.model.release(request.request_id)
                request.context.start_idx = 0
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            rows.append((request, count))
            scheduled.add(id(request))
            budget -= count
        return rows

    def _token_count(self, request: Request, budget: int, others: bool) -> int:
        pending = request.num_pending
        if pending <= budget:
            return pending
        if self.config.enable_chunked_prefill:
            return budget
        return 0 if others else pending  # whole prompts only: a long one runs alone

    def _preemption_victim(self, scheduled: set[int]) -> Request:
        """The newest running request not yet given tokens this step (the one asking is always a candidate)."""
        return max((r for r in self.running if id(r) not in scheduled), key=lambda r: r.arrival)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.model.release(request.request_id)
        request.context.start_idx = 0  # recompute prompt and generated tokens when it runs again
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(request)
        logger.info("preempted request %s (KV cache full; %d tokens to recompute)", request.request_id,
                    request.context.active_idx)

    # running ------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Schedule, run the model once, sample and retire finished requests."""
        return self.run_rows(self.schedule())

    def run_rows(self, rows: list[tuple[Request, int]]) -> list[StepOutput]:
        """Run scheduled rows (:meth:`schedule`) on the model, sample, apply stop rules."""
        if not rows:
            if self.waiting and not self.running:
                request = self.waiting[0]
                raise RuntimeError(f"request {request.request_id} ({request.context.active_idx} tokens) cannot be "
                                   f"admitted even with the KV cache empty; raise the KV cache size")
            return []
        contexts = [(request.context, count) for request, count in rows]
        logits = self.model.execute_rows(contexts)
        self.stats.steps += 1
        self.stats.scheduled_tokens += sum(count for _, count in rows)
        self.stats.batch_sizes.append(len(rows))
        finishing = [i for i, (request, count) in enumerate(rows) if count == request.num_pending]
        tokens = sample_contexts(logits[finishing], [rows[i][0].context for i in finishing]) if finishing else []
        sampled = dict(zip(finishing, (int(t) for t in tokens)))
        outputs = []
        for i, (request, count) in enumerate(rows):
            ctx = request.context
            ctx.start_idx += count
            if i not in sampled:
                self.stats.prompt_chunks += 1
                continue
            ctx.append(sampled[i])
            logprobs = _log_probabilities(logits[i], sampled[i], ctx.sampling.top_logprobs) \
                if ctx.sampling.top_logprobs else None
            outputs.append(StepOutput(request.request_id, sampled[i], ctx.finish_reason, logprobs))
            if ctx.is_done:
                self._finish(request)
        return outputs

    def _finish(self, request: Request) -> None:
        self.running.remove(request)
        self.requests.pop(request.request_id, None)
        request.status = RequestStatus.FINISHED
        self.model.release(request.request_id)

    def run_to_completion(self) -> dict[str, list[int]]:
        """Step until every request is finished; the generated tokens per request id."""
        contexts = {r.request_id: r.context for r in [*self.running, *self.waiting]}
        while self.has_unfinished:
            self.step()
        return {request_id: ctx.generated for request_id, ctx in contexts.items()}


def _log_probabilities(logits: np.ndarray, token: int, top_n: int) -> dict[str, Any]:
    logp = log_softmax(logits)
    top = np.argsort(-logp)[:top_n]
    return {"token_log_probability": float(logp[token]), "top": {int(t): float(logp[t]) for t in top}}


def describe(stats: SchedulerStats) -> dict[str, Any]:
    """Scheduler counters as plain numbers (for logs and benchmarks)."""
    sizes = stats.batch_sizes or [0]
    return {"steps": stats.steps, "preemptions": stats.preemptions, "scheduled_tokens": stats.scheduled_tokens,
            "prompt_chunks": stats.prompt_chunks, "mean_batch": float(np.mean(sizes)), "max_batch": max(sizes)}
