"""Server-sent events, as OpenAI streams: ``data: {json}`` per chunk, ``data: [DONE]`` at the end.

:class:`EventStream` is Starlette's streaming response with one guarantee added: however the response ends
(finished, the client disconnected, the server shutting down), the event generator is closed before the
response returns, so the requests it runs on the engine are cancelled and their KV cache freed then, not
whenever the garbage collector reaches the generator.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import APIError, error_body
from .generation import ChoiceDelta, GenerationFailed
from .response_schemas import Usage

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def error_event(error: APIError) -> str:
    """A failure after the stream began (its status is sent already): OpenAI's clients raise it from the body."""
    return f"data: {json.dumps(error_body(error))}\n\n"


class EventStream(StreamingResponse):
    def __init__(self, events: AsyncGenerator[str, None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]


async def choice_events(deltas: AsyncGenerator[ChoiceDelta, None], render: Callable[[ChoiceDelta], BaseModel | None], *,
                        prompt_tokens: int, first: tuple[BaseModel, ...] = (),
                        usage_chunk: Callable[[Usage], BaseModel] | None = None) -> AsyncGenerator[str, None]:
    """The events of a streamed completion: ``first`` chunks, then ``render(delta)`` of each delta (None: nothing
    to send), then the usage chunk when asked (``stream_options.include_usage``) and ``[DONE]``. A failure of the
    engine ends the stream with an error event."""
    completion_tokens = 0
    try:
        for chunk in first:
            yield event(chunk)
        async with contextlib.aclosing(deltas) as stream:
            async for delta in stream:
                completion_tokens += delta.num_tokens
                rendered = render(delta)
                if rendered is not None:
                    yield event(rendered)
    except GenerationFailed as error:
        yield error_event(APIError(500, f"generation failed: {error}"))
        return
    except Exception as error:  # the status is sent already: the client can only learn of it in the body
        logger.exception("stream failed")
        yield error_event(APIError(500, f"internal error: {type(error).__name__}: {error}"))
        return
    if usage_chunk is not None:
        yield event(usage_chunk(Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                      total_tokens=prompt_tokens + completion_tokens)))
    yield DONE
