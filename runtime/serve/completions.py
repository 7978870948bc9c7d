"""``POST /v1/completions``: OpenAI's legacy completions, streamed or whole.

A prompt is text (encoded as ``ember generate --no-chat-template`` encodes it) or token ids, or a list of either;
each gets ``n`` choices. ``logprobs: k`` reports each generated token's log probability and the ``k`` most likely
alternatives; with ``echo`` the prompt is repeated in front of the text, and with both the prompt's own log
probabilities are computed too (the engine's ``prompt_logprobs``, the first prompt token's being None).
``max_tokens: 0`` with ``echo`` scores a prompt without generating: one token is computed and not reported.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .choices import check_lengths, choice_specs, encode_prompt
from .generation import ChoiceDelta, ChoiceSpec, collect_choices, merge_choices, run_choice
from .logprobs import completion_logprobs, next_offset
from .request_schemas import CompletionRequest
from .response_schemas import CompletionChoice, CompletionLogprobs, CompletionResponse, Usage
from .sse import EventStream, choice_events
from .state import ServedGenerator

router = APIRouter()


async def _scoring_only(deltas: AsyncGenerator[ChoiceDelta, None]) -> AsyncGenerator[ChoiceDelta, None]:
    """``max_tokens: 0``: the computed token is not part of the answer; the choice ends by length at once."""
    async with contextlib.aclosing(deltas) as stream:
        async for delta in stream:
            yield ChoiceDelta(delta.index, finish_reason="length", prompt_logprobs=delta.prompt_logprobs)
            return


class _Choices:
    """What the response needs to know of the request's choices: prompts, their text, the log probability form."""

    def __init__(self, model: ServedGenerator, body: CompletionRequest, prompts: list[list[int]],
                 specs: Sequence[ChoiceSpec]):
        self.model = model
        self.body = body
        self.prompts = prompts
        self.texts = [p if isinstance(p, str) else model.tokenizer.decode(ids)
                      for p, ids in zip(body.prompts, prompts)]
        self.specs = {spec.index: spec for spec in specs}
        self.offsets: dict[int, int] = {}  # streaming: where each choice's next token's text starts
        self.started: set[int] = set()

    def prompt_of(self, index: int) -> int:
        return index // self.body.n

    def logprobs(self, delta: ChoiceDelta, first: bool) -> CompletionLogprobs | None:
        """The delta's tokens (after the prompt's, on a choice's first delta with ``echo``) in the legacy form."""
        if self.body.logprobs is None:
            return None
        tokenizer = self.model.tokenizer
        out = CompletionLogprobs()
        offset = self.offsets.get(delta.index, 0)
        if first and self.body.echo:
            prompt = self.prompts[self.prompt_of(delta.index)]
            completion_logprobs(tokenizer, delta.prompt_logprobs or [None] * len(prompt), prompt, offset, out)
            offset = next_offset(out)
        completion_logprobs(tokenizer, delta.logprobs, [e.token for e in delta.logprobs], offset, out)
        self.offsets[delta.index] = next_offset(out) if out.tokens else offset
        return out

    def choice(self, delta: ChoiceDelta) -> CompletionChoice:
        """The choice object for a whole choice, or for a streamed delta (see :meth:`chunk`)."""
        first = delta.index not in self.started
        self.started.add(delta.index)
        text = (self.texts[self.prompt_of(delta.index)] if first and self.body.echo else "") + delta.text
        return CompletionChoice(index=delta.index, text=text, logprobs=self.logprobs(delta, first),
                                finish_reason=delta.finish_reason)

    def chunk(self, delta: ChoiceDelta) -> CompletionChoice | None:
        """The choice object of a streamed delta; None when it has nothing to say (no text, tokens or reason)."""
        choice = self.choice(delta)
        if not choice.text and not choice.finish_reason and not (choice.logprobs and choice.logprobs.tokens):
            return None
        return choice


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> Response | CompletionResponse:
    arrival = time.perf_counter()
    metrics = request.app.state.metrics
    model = request.app.state.models.text_model(body.model)
    prompts = [encode_prompt(model, p) for p in body.prompts]
    scoring = body.max_tokens == 0
    max_tokens = 1 if scoring else body.max_tokens
    for prompt in prompts:
        check_lengths(model, prompt, max_tokens, "prompt")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    specs = choice_specs(request_id, prompts, body, max_tokens, logprobs=body.logprobs,
                         echo_logprobs=body.echo and body.logprobs is not None)
    prompt_tokens = sum(len(p) for p in prompts)
    metrics.prompt_tokens.labels(model.name).inc(prompt_tokens)
    streams = [run_choice(model, spec, metrics, arrival) for spec in specs]
    if scoring:
        streams = [_scoring_only(stream) for stream in streams]
    choices = _Choices(model, body, prompts, specs)
    created = int(time.time())

    def response(items: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=request_id, created=created, model=model.name, choices=items, usage=usage)

    if body.stream:
        def render(delta: ChoiceDelta) -> CompletionResponse | None:
            choice = choices.chunk(delta)
            return None if choice is None else response([choice])

        usage_chunk = (lambda usage: response([], usage)) if body.include_usage else None
        return EventStream(choice_events(merge_choices(streams), render, prompt_tokens=prompt_tokens,
                                         usage_chunk=usage_chunk))
    results, usage = await collect_choices(streams, [spec.index for spec in specs], prompt_tokens)
    return response([choices.choice(r) for r in results], usage)
