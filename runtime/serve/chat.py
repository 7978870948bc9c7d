"""``POST /v1/chat/completions``: a conversation rendered by the model's chat template, streamed or whole.

The prompt is what ``ember generate`` builds for the same single user message (the tokenizer's
``apply_chat_template``), so greedy answers are the same. ``logprobs: true`` (with ``top_logprobs: k``) reports
each generated token's log probability and ``k`` alternatives. A stream starts with the assistant's role, as
OpenAI's does, before the first token is computed.
"""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .choices import check_lengths, choice_specs
from .errors import APIError
from .generation import ChoiceDelta, collect_choices, merge_choices, run_choice
from .logprobs import chat_logprobs
from .request_schemas import ChatCompletionRequest
from .response_schemas import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                               ChatMessageOut, DeltaMessage, Usage)
from .sse import EventStream, choice_events
from .state import ServedGenerator

router = APIRouter()


def _prompt(model: ServedGenerator, body: ChatCompletionRequest) -> list[int]:
    tokenizer = model.tokenizer
    if not tokenizer.has_chat_template:
        raise APIError(400, f"the model {model.name!r} has no chat template; use /v1/completions",
                       param="messages", code="no_chat_template")
    try:
        return list(tokenizer.apply_chat_template(body.chat_messages()))
    except ValueError as error:  # a content part that is not text, or the template refusing the conversation
        raise APIError(400, str(error), param="messages", code="invalid_value") from None


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
    arrival = time.perf_counter()
    metrics = request.app.state.metrics
    model = request.app.state.models.text_model(body.model)
    prompt = _prompt(model, body)
    max_tokens = body.token_limit
    check_lengths(model, prompt, max_tokens, "messages")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    specs = choice_specs(request_id, [prompt], body, max_tokens,
                         logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    metrics.prompt_tokens.labels(model.name).inc(len(prompt))
    streams = [run_choice(model, spec, metrics, arrival) for spec in specs]
    created = int(time.time())
    tokenizer = model.tokenizer

    if body.stream:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=model.name, choices=choices, usage=usage)

        def render(delta: ChoiceDelta) -> ChatCompletionChunk | None:
            if not delta.text and not delta.logprobs and delta.finish_reason is None:
                return None
            logprobs = chat_logprobs(tokenizer, delta.logprobs) if body.logprobs else None
            return chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(content=delta.text or None),
                                          logprobs=logprobs, finish_reason=delta.finish_reason)])

        roles = tuple(chunk([ChatChunkChoice(index=spec.index, delta=DeltaMessage(role="assistant", content=""))])
                      for spec in specs)
        usage_chunk = (lambda usage: chunk([], usage)) if body.include_usage else None
        return EventStream(choice_events(merge_choices(streams), render, prompt_tokens=len(prompt), first=roles,
                                         usage_chunk=usage_chunk))
    results, usage = await collect_choices(streams, [spec.index for spec in specs], len(prompt))
    choices = [ChatChoice(index=r.index, message=ChatMessageOut(content=r.text), finish_reason=r.finish_reason,
                          logprobs=chat_logprobs(tokenizer, r.logprobs) if body.logprobs else None) for r in results]
    return ChatCompletionResponse(id=request_id, created=created, model=model.name, choices=choices, usage=usage)
