"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.

Every bad input becomes a 4xx whose message names the field, what is allowed and what was given;
FastAPI's own 422 for body validation is answered as a 400, like OpenAI does.
"""
from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client as-is, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


_MAX_MESSAGE_CHARS = 1000   # messages quote the client's values; a huge value must not come back whole


def error_body(status: int, message: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    # A message may quote the client's text, lone surrogates included; those cannot be UTF-8.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + "…"
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code if code is not None else status}}


def error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    if error.status in (429, 503):
        from ondo.server.guard import RETRY_AFTER_S

        headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def param_of(message: str, known: set[str]) -> str | None:
    """The request field a SamplingParams message names ("top_p must be ..." -> "top_p")."""
    match = re.match(r"([a-z_]+)", message)
    return match.group(1) if match and match.group(1) in known else None


# Labels pydantic puts in an error's location for the branch of a union or a validator.
_BRANCH_LABEL = re.compile(r"^[a-z-]+\[.*\]$|^(str|int|float|bool|list|dict|none)$")


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return f"the request body is not valid JSON: {detail}", None
    if not loc and first.get("type") == "missing":
        return "the request body is empty: send a JSON object", None
    if not loc:
        return f"the request body must be a JSON object: {first.get('msg')}", None
    field_parts = [str(p) for p in loc if not (isinstance(p, str) and _BRANCH_LABEL.match(p))]
    path = ".".join(field_parts) or str(loc[0])
    param = str(loc[0])
    if first.get("type") == "extra_forbidden":
        return f"unknown field '{path}': ondo does not accept it", param
    if first.get("type") == "missing":
        return f"'{path}' is required", param
    given = first.get("input")
    shown = repr(given)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    same_field = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:1] == loc[:1]]
    if len(same_field) > 1 and any(isinstance(p, str) and _BRANCH_LABEL.match(p) for p in loc):
        # A union: a branch of the right type that refused the value says why; else no type fits.
        refused = next((e for e in same_field if e.get("type") == "value_error"), None)
        if refused is not None:
            where = ".".join(str(p) for p in refused["loc"] if p != "body" and not (isinstance(p, str) and _BRANCH_LABEL.match(p)))
            return f"'{where}': {refused['msg'].removeprefix('Value error, ')}", param
        return f"'{param}' has the wrong type: none of its allowed forms accept {shown}", param
    if first.get("type") == "value_error":
        return f"'{path}': {first['msg'].removeprefix('Value error, ')}", param
    return f"'{path}': {first.get('msg')}, got {shown}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()) or [{}])
        return error_response(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return JSONResponse(error_body(500, f"internal server error: {type(exc).__name__}"),
                            status_code=500)
