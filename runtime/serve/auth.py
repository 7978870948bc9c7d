"""The API key: ``Authorization: Bearer KEY`` on every ``/v1`` route when the server was given one.

A pure ASGI middleware rather than a FastAPI dependency, so that the key is checked before anything else
happens to the request: a client without the key learns only that (401), never how its body would have
been parsed. ``/health`` and ``/metrics`` stay open, as in vLLM, for load balancers and Prometheus.
The comparison takes constant time (``hmac.compare_digest``).
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, error_response

PROTECTED_PREFIX = "/v1"


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        if not api_key:
            raise ValueError("an API key cannot be empty")
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization")
        if given is None or not hmac.compare_digest(given, self._expected):
            message = ("missing API key: send it as 'Authorization: Bearer KEY'" if given is None
                       else "incorrect API key")
            await error_response(APIError(401, message, code="invalid_api_key"))(scope, receive, send)
            return
        await self.app(scope, receive, send)
