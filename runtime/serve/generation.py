"""Running one choice on the engine: engine steps in, text deltas out (detokenized, stop strings held back).

:func:`run_choice` is the one loop both generation endpoints use, streaming or not. It reads the engine's
``StepOutput`` through :func:`step_outcome` (the only place that knows how a step reports its end), feeds tokens
to the tokenizer's incremental detokenizer (the one ``ember generate`` uses, so the text is the same) and the
stop-string matcher, and records the latency metrics. Leaving it early (a client that disconnects, a stop string)
leaves the engine's stream, which cancels the request and frees its KV cache at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..pipelines.context import SamplingParams
from .errors import APIError
from .metrics import ServerMetrics
from .response_schemas import FinishReasonName, Usage
from .state import ServedGenerator
from .stop_strings import StopStringMatcher


class GenerationFailed(Exception):
    """The engine failed while computing the request (its message is the engine's)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log probability and the most likely alternatives at its position (token id -> log prob)."""

    token: int
    logprob: float
    top: dict[int, float]


@dataclass(frozen=True)
class ChoiceSpec:
    """One choice to generate: its engine request, and what to report (``top_n`` alternatives when
    ``logprobs``; the prompt's log probabilities when ``sampling.prompt_logprobs`` is set)."""

    index: int
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    stops: tuple[str, ...] = ()
    logprobs: bool = False
    top_n: int = 0


@dataclass
class ChoiceDelta:
    """What one engine step added to a choice: text (possibly empty while a stop string may be starting), the
    tokens' log probabilities, the generated token count, and the finish reason on the last delta."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: FinishReasonName | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, delta: ChoiceDelta) -> None:
        """Append a later delta of the same choice (a whole choice is the sum of its deltas)."""
        self.text += delta.text
        self.logprobs.extend(delta.logprobs)
        self.num_tokens += delta.num_tokens
        self.finish_reason = delta.finish_reason or self.finish_reason
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs


def step_outcome(output: Any) -> tuple[FinishReasonName | None, str | None]:
    """``(finish_reason, error)`` of an engine ``StepOutput``: ``"stop"`` / ``"length"`` or None, and the engine's
    error message or None. A failure is read from ``output.error``; an engine that reports it as a finish reason
    ``"error: ..."`` (the form before ``StepOutput.error``) is understood too."""
    error = getattr(output, "error", None)
    reason = output.finish_reason
    if reason is None:
        return None, error
    text = str(getattr(reason, "value", reason))
    if text.startswith("error"):
        return None, error or text.partition(":")[2].strip() or text
    if text == "length":
        return "length", error
    if text == "stop":
        return "stop", error
    raise ValueError(f"the engine gave an unknown finish reason {text!r}")


def _entry(token: int, log_probabilities: dict[str, Any], top_n: int) -> TokenLogprob:
    top = dict(list(log_probabilities["top"].items())[:top_n])
    return TokenLogprob(int(token), float(log_probabilities["token_log_probability"]), top)


def _prompt_entries(spec: ChoiceSpec, entries: Sequence[dict[str, Any] | None]) -> list[TokenLogprob | None]:
    return [None if lp is None else _entry(token, lp, spec.top_n) for token, lp in zip(spec.prompt, entries)]


async def run_choice(model: ServedGenerator, spec: ChoiceSpec, metrics: ServerMetrics,
                     arrival: float) -> AsyncGenerator[ChoiceDelta, None]:
    """The choice's deltas, one per engine step that produced a token; the last carries the finish reason.
    ``arrival`` (``time.perf_counter()``) is when the request came in: the time to first token counts from it."""
    detokenizer = model.tokenizer.detokenizer()
    matcher = StopStringMatcher(spec.stops)
    last_token_at: float | None = None
    outcome = "abort"
    try:
        generate = model.async_engine.generate(spec.prompt, spec.sampling, spec.request_id)
        async with contextlib.aclosing(generate) as outputs:
            async for output in outputs:
                finish_reason, error = step_outcome(output)
                if error is not None:
                    outcome = "error"
                    raise GenerationFailed(error)
                delta = ChoiceDelta(spec.index)
                if output.token is not None:
                    now = time.perf_counter()
                    if last_token_at is None:
                        metrics.time_to_first_token.labels(model.name).observe(now - arrival)
                    else:
                        metrics.inter_token_latency.labels(model.name).observe(now - last_token_at)
                    last_token_at = now
                    metrics.generation_tokens.labels(model.name).inc()
                    delta.num_tokens = 1
                    delta.text = matcher.push(detokenizer.add([output.token]))
                    if spec.logprobs and output.log_probabilities is not None:
                        delta.logprobs.append(_entry(output.token, output.log_probabilities, spec.top_n))
                if output.prompt_log_probabilities is not None:
                    delta.prompt_logprobs = _prompt_entries(spec, output.prompt_log_probabilities)
                if not matcher.stopped and finish_reason is not None:
                    delta.text += matcher.push(detokenizer.flush())
                    delta.text += matcher.flush()
                if matcher.stopped:
                    finish_reason = "stop"
                delta.finish_reason = finish_reason
                if finish_reason is not None:
                    outcome = finish_reason
                yield delta
                if finish_reason is not None:
                    return  # after a stop string: closing the engine's stream cancels the request
    finally:
        metrics.finished.labels(model.name, outcome).inc()


async def merge_choices(streams: Sequence[AsyncGenerator[ChoiceDelta, None]]) -> AsyncGenerator[ChoiceDelta, None]:
    """The deltas of several choices as they come (``n`` > 1, or several prompts). Leaving early, or a failure
    of one choice, cancels the others (their requests are aborted and their KV cache freed)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for delta in only:
                yield delta
        return
    queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[ChoiceDelta, None]) -> None:
        try:
            async with contextlib.aclosing(stream) as deltas:
                async for delta in deltas:
                    queue.put_nowait(delta)
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(error)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.get_running_loop().create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_choices(streams: Sequence[AsyncGenerator[ChoiceDelta, None]], indices: Sequence[int],
                          prompt_tokens: int) -> tuple[list[ChoiceDelta], Usage]:
    """Every choice run to its end (all its deltas added up), in ``indices`` order, and the response's usage
    (``prompt_tokens`` and the choices' generated tokens). An engine failure is a 500."""
    results = {i: ChoiceDelta(i) for i in indices}
    try:
        async with contextlib.aclosing(merge_choices(streams)) as deltas:
            async for delta in deltas:
                results[delta.index].add(delta)
    except GenerationFailed as error:
        raise APIError(500, f"generation failed: {error}") from None
    completion_tokens = sum(r.num_tokens for r in results.values())
    return [results[i] for i in indices], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                total_tokens=prompt_tokens + completion_tokens)
