"""Errors as OpenAI writes them: ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

OpenAI's clients read that body to raise their typed exceptions (``BadRequestError`` for 400,
``AuthenticationError`` for 401, ``NotFoundError`` for 404, ...), so every failure the server reports goes through
here: the handlers below turn FastAPI's own failures (malformed JSON, a field of the wrong type or out of range,
an unknown route) into the same shape, with 400 where FastAPI would answer 422, as OpenAI does.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})


class APIError(Exception):
    """A failure to report to the client: ``status`` and OpenAI's ``type`` / ``param`` / ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")


def error_body(error: APIError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status)


def _validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first of pydantic's complaints, as OpenAI's 400 (``param``: the field's dotted path in the body)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                        code="invalid_json")
    # pydantic names the member of a union it tried ("str", "list[int]") in the location: not part of the body
    location = [str(part) for part in first.get("loc", ()) if part != "body" and str(part) not in _UNION_TAGS
                and "[" not in str(part)]
    param = location[0] if location else None
    if first.get("type") == "missing" and not location:
        return APIError(400, "the request needs a JSON body", code="invalid_json")
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if param is None:  # a check across fields (request_schemas.py) starts its message with the field's name
        named = re.match(r"([a-z_]+): ", message)
        param = named.group(1) if named else None
        return APIError(400, message, param=param, code="invalid_value")
    return APIError(400, f"{'.'.join(location)}: {message}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Every failure FastAPI, Starlette or an endpoint raises answers with OpenAI's error body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(list(error.errors())))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(APIError(error.status_code, str(error.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed")
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}"))
