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

The scheduler only decides: :meth:`Scheduler.schedule` returns a plain :class:`SchedulerOutput`; the model
runner (``pipelines/model_runner.py``, the one stepping path) executes it, samples and appends; and
:meth:`Scheduler.update` retires the requests that finished (vLLM v1's split). :meth:`Scheduler.step` is the
three in a row.
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
from .pipelines.model_runner import ModelRunner, RowResult

logger = logging.getLogger(__name__)


class SchedulableModel(Protocol):
    """What the scheduler needs of a pipeline model: its KV cache decisions (``DecoderPipelineModel``)."""

    @property
    def max_batch_size(self) -> int: ...

    def admit(self, context: TextContext) -> bool: ...

    def reserve(self, context: TextContext, num_tokens: int) -> bool: ...

    def release(self, request_id: str) -> None: ...


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
class ScheduledRequest:
    """One row of a step: compute ``num_tokens`` of the request's known tokens from its ``start_idx``."""

    request_id: str
    context: TextContext
    num_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    """A step's decision, as plain data: the rows to run (running requests first) and who was preempted."""

    scheduled: tuple[ScheduledRequest, ...] = ()
    preempted: tuple[str, ...] = ()

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(row.num_tokens for row in self.scheduled)

    @property
    def rows(self) -> list[tuple[TextContext, int]]:
        """``(context, tokens to compute)`` per row: what the model runner executes."""
        return [(row.context, row.num_tokens) for row in self.scheduled]


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request: a new token, its log probabilities (``top_logprobs``), the
    prompt's (``prompt_logprobs``, with the first token only), and whether the request ended: a finish reason,
    or ``error`` when the step failed (the request is then aborted)."""

    request_id: str
    token: int | None
    finish_reason: FinishReason | None = None
    log_probabilities: dict[str, Any] | None = None
    error: str | None = None
    prompt_log_probabilities: list[dict[str, Any] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


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
    def schedule(self) -> SchedulerOutput:
        """This step's rows, running requests first (see the module docstring); a RuntimeError when the oldest
        waiting request cannot run even with the KV cache empty."""
        budget = self.config.max_num_batched_tokens
        rows: list[tuple[Request, int]] = []
        scheduled: set[int] = set()
        preempted: list[str] = []
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            count = self._token_count(request, budget, bool(rows))
            if count == 0:
                continue
            while not self.model.reserve(request.context, count):
                if count > request.num_pending:  # draft tokens do not justify preempting anyone: drop them
                    request.context.draft_tokens = []
                    count = request.num_pending
                    continue
                victim = self._preemption_victim(scheduled)
                self._preempt(victim)
                preempted.append(victim.request_id)
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
        if not rows and self.waiting and not self.running:
            request = self.waiting[0]
            raise RuntimeError(f"request {request.request_id} ({request.context.active_idx} tokens) cannot be "
                               f"admitted even with the KV cache empty; raise the KV cache size")
        return SchedulerOutput(tuple(ScheduledRequest(r.request_id, r.context, n) for r, n in rows), tuple(preempted))

    def _token_count(self, request: Request, budget: int, others: bool) -> int:
        pending = request.num_pending
        drafts = request.context.draft_tokens
        if pending == 1 and drafts:  # a decoding row verifies its draft tokens too (speculative decoding)
            del drafts[budget - 1:]
            return 1 + len(drafts)
        chunk = request.context.max_chunk
        if chunk is not None and chunk < pending:  # a prompt computed position by position
            return min(chunk, budget)
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
    def update(self, output: SchedulerOutput, results: Sequence[RowResult]) -> list[StepOutput]:
        """Account for a step the model runner executed: one output per sampled token (a speculative row may
        yield several, in order); finished requests leave (their KV cache is freed)."""
        self.stats.steps += bool(output.scheduled)
        self.stats.scheduled_tokens += output.num_scheduled_tokens
        if output.scheduled:
            self.stats.batch_sizes.append(len(output.scheduled))
        outputs = []
        for result in results:
            request = self.requests.get(result.request_id)
            if result.token is None:
                self.stats.prompt_chunks += 1
                continue
            ctx = request.context if request is not None else None
            prompt = ctx.prompt_log_probabilities if ctx is not None and len(ctx.generated) == 1 and \
                ctx.sampling.prompt_logprobs is not None else None
            outputs.append(StepOutput(result.request_id, result.token, result.finish_reason, result.log_probabilities,
                                      prompt_log_probabilities=prompt))
            if request is not None and ctx is not None and ctx.is_done and request.status is RequestStatus.RUNNING:
                self._finish(request)  # once, though a verified row may have produced several outputs
        return outputs

    def step(self, runner: ModelRunner) -> list[StepOutput]:
        """Schedule, have ``runner`` execute the decision, update."""
        output = self.schedule()
        return self.update(output, runner.execute(output.rows))

    def _finish(self, request: Request) -> None:
        self.running.remove(request)
        self.requests.pop(request.request_id, None)
        request.status = RequestStatus.FINISHED
        self.model.release(request.request_id)

def describe(stats: SchedulerStats) -> dict[str, Any]:
    """Scheduler counters as plain numbers (for logs and benchmarks)."""
    sizes = stats.batch_sizes or [0]
    return {"steps": stats.steps, "preemptions": stats.preemptions, "scheduled_tokens": stats.scheduled_tokens,
            "prompt_chunks": stats.prompt_chunks, "mean_batch": float(np.mean(sizes)), "max_batch": max(sizes)}
