"""Anthropic's Messages API (POST /v1/messages): request and response bodies, and its error shape.

Errors on this endpoint are Anthropic's, `{"type": "error", "error": {"type", "message"}}`, whatever
raised them (body validation, the API key, the engine): `AnthropicRoute` converts them, so
Anthropic's own client reads them. Content blocks are checked in serving_messages.py, so that an
image or a tool result gets a 400 naming it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ondo.server.errors import APIError, _validation_message
from ondo.server.protocol import Int, Text, _ranged, _Request

logger = logging.getLogger(__name__)

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class AnthropicMessage(_Request):
    role: Literal["user", "assistant"]
    content: Text | list[dict[str, Any]] = Field(
        description="Text, or a list of {\"type\": \"text\", \"text\": ...} blocks.")


class MessagesRequest(_Request):
    model: str | None = Field(None, description="Must name the served model when given.")
    messages: list[AnthropicMessage] = Field(
        description="Alternating user and assistant turns; a final assistant turn is continued.")
    max_tokens: Int = _ranged("Most tokens to generate (required, as in Anthropic's API).", ..., ge=1)
    system: Text | list[dict[str, Any]] | None = Field(None, description="The system prompt: text or text blocks.")
    stop_sequences: list[Text] | None = Field(None, description="Strings that end the generation (not returned).")
    stream: bool = False
    temperature: float | None = _ranged("0 = greedy.", ge=0)
    top_p: float | None = _ranged("Nucleus sampling mass.", gt=0, le=1)
    top_k: Int | None = _ranged("Keep the k most likely tokens.", ge=1)
    metadata: dict[str, Any] | None = Field(None, description="Accepted for compatibility ({\"user_id\"}); not used.")
    cache_control: dict[str, Any] | None = Field(
        None, description="Accepted; ondo caches prompt prefixes by itself, whatever this says.")
    # Anthropic fields ondo does not implement: a 400 unless neutral.
    tools: Any = None
    tool_choice: Any = None
    thinking: Any = None
    service_tier: Any = None
    container: Any = None
    mcp_servers: Any = None
    output_config: Any = None
    speed: Any = None


MESSAGES_NEUTRAL: dict[str, tuple] = {
    "tools": ([],),
    "tool_choice": ({"type": "none"}, {"type": "auto"}),
    "thinking": ({"type": "disabled"},),
    "service_tier": ("auto", "standard_only"),
    "output_config": ({},),
    "speed": ("standard",),
}
MESSAGES_UNSUPPORTED = ("tools", "tool_choice", "thinking", "service_tier", "container", "mcp_servers",
                        "output_config", "speed")


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class MessagesUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = Field(0, description="Prompt tokens served from ondo's prefix cache.")
    cache_creation_input_tokens: int = 0


class MessagesResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence"] | None
    stop_sequence: str | None = None
    usage: MessagesUsage


class AnthropicErrorInfo(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorInfo


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}


def anthropic_error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(anthropic_error_body(status, message), status_code=status)


class AnthropicRoute(APIRoute):
    """A route whose every error is answered in Anthropic's shape instead of OpenAI's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def anthropic_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as exc:
                return anthropic_error_response(exc.status, exc.message)
            except RequestValidationError as exc:
                message, _ = _validation_message(list(exc.errors()) or [{}])
                return anthropic_error_response(400, message)
            except StarletteHTTPException as exc:
                return anthropic_error_response(exc.status_code, str(exc.detail))
            except Exception as exc:  # noqa: BLE001 -- answered in this API's shape, logged in full
                logger.exception("unexpected error while serving a request")
                return anthropic_error_response(500, f"internal server error: {type(exc).__name__}")

        return anthropic_errors
