"""What protects the server from its clients, before any route runs: an ASGI middleware that gives
every request an id, refuses work while the server shuts down, checks the API key before reading
a byte of the body, caps and times the body read; and uvicorn's HTTP protocol with a deadline for
a request's headers (a client that sends them byte by byte is dropped), so idle or half-open
sockets cannot pile up until the process runs out of file descriptors.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from ondo.server.errors import error_body

REQUEST_ID_HEADER = "x-request-id"
RETRY_AFTER_S = 5   # what 429 and 503 answers ask clients to wait
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# Paths anyone may read; every other path needs the API key (when one is set).
_PUBLIC_PATHS = frozenset({"/", "/health", "/version", "/metrics", "/docs", "/redoc", "/openapi.json",
                           "/docs/oauth2-redirect"})
_ANTHROPIC_PATHS = frozenset({"/v1/messages"})
_METHODS_WITH_BODY = ("POST", "PUT", "PATCH")

# The id of the request being served, for log lines (see logs.py) and error answers.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("ondo_request_id", default=None)


@dataclass(frozen=True)
class ServerLimits:
    """How much the server lets one client hold. Defaults suit a server on a private network."""
    max_request_body_bytes: int = 32 * 1024 * 1024
    request_timeout_s: float = 30.0      # to send a request's headers, and then its whole body
    timeout_keep_alive_s: float = 5.0    # an idle keep-alive connection is closed after this
    limit_concurrency: int | None = 512  # connections + tasks; over it uvicorn answers 503
    shutdown_timeout_s: float = 10.0     # on SIGTERM, open streams may finish within this

    def __post_init__(self) -> None:
        if not isinstance(self.max_request_body_bytes, int) or self.max_request_body_bytes < 1024:
            raise ValueError(f"max_request_body_bytes must be >= 1024, got {self.max_request_body_bytes!r}")
        for name in ("request_timeout_s", "timeout_keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s!r}")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError(f"limit_concurrency must be >= 1 (or None), got {self.limit_concurrency!r}")


def shown(value: Any, limit: int = 200) -> str:
    """A client's value as an error message may quote it: at most `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class GuardMiddleware:
    """Pure ASGI (no buffering of responses, so SSE streams pass through untouched)."""

    def __init__(self, app: Any, limits: ServerLimits, api_key: str | None,
                 is_draining: Callable[[], bool]) -> None:
        self.app, self.limits, self.api_key, self.is_draining = app, limits, api_key, is_draining

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        given_id = headers.get(REQUEST_ID_HEADER, "")
        request_id = given_id if _SANE_REQUEST_ID.match(given_id) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        try:
            await self._serve(scope, receive, _with_headers(send, request_id), headers)
        finally:
            request_id_var.reset(token)

    async def _serve(self, scope: dict, receive: Callable, send: Callable, headers: dict[str, str]) -> None:
        path = scope.get("path", "")
        anthropic = path in _ANTHROPIC_PATHS
        if self.is_draining():
            await _reject(send, 503, "the server is shutting down; retry on another instance", anthropic)
            return
        if self.api_key is not None and path not in _PUBLIC_PATHS and not path.startswith("/static/") \
                and not _key_matches(headers, self.api_key, accept_x_api_key=anthropic):
            message = ("a valid API key is required: send the header 'x-api-key: <key>' (or 'Authorization: "
                       "Bearer <key>')") if anthropic else \
                "a valid API key is required: send the header 'Authorization: Bearer <key>'"
            # The body (maybe huge) stays unread: the connection closes after the answer.
            await _reject(send, 401, message, anthropic, code="invalid_api_key",
                          close=scope.get("method") in _METHODS_WITH_BODY)
            return
        if scope.get("method") not in _METHODS_WITH_BODY:
            await self.app(scope, receive, send)
            return
        cap = self.limits.max_request_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            await _reject(send, 413, f"the request body has {declared} bytes; this server accepts at most "
                                     f"{cap} (--max-request-body-bytes)", anthropic, close=True)
            return
        body = await self._read_body(receive, send, cap, anthropic)
        if body is not None:
            await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Callable, send: Callable, cap: int, anthropic: bool) -> bytes | None:
        """The whole body, read in the chunks the client sends; None when it was answered (too big,
        too slow) or the client left."""
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.request_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await _reject(send, 408, f"the request body did not arrive within "
                                         f"{self.limits.request_timeout_s:g} s (--request-timeout)", anthropic,
                              close=True)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await _reject(send, 413, f"the request body is larger than {cap} bytes, the most this server "
                                         f"accepts (--max-request-body-bytes)", anthropic, close=True)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _key_matches(headers: dict[str, str], expected: str, accept_x_api_key: bool) -> bool:
    """The same rule as the routes' own checks (routes.py): Bearer, or Anthropic's x-api-key."""
    scheme, _, bearer = headers.get("authorization", "").partition(" ")
    given = headers.get("x-api-key") if accept_x_api_key else None
    if given is None:
        given = bearer if scheme.lower() == "bearer" else ""
    return secrets.compare_digest(given.strip().encode(), expected.encode())


def _replay(body: bytes, receive: Callable) -> Callable:
    """A receive that hands the app the body read already, then the client's later messages
    (a disconnect while streaming)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_headers(send: Callable, request_id: str) -> Callable:
    async def send_with_headers(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            names = {k.lower() for k, _ in headers}
            headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
            content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            if content_type.startswith(b"text/event-stream") and b"cache-control" not in names:
                headers.append((b"cache-control", b"no-cache"))
                headers.append((b"x-accel-buffering", b"no"))   # proxies must not hold events back
            status = message.get("status", 200)
            if status in (429, 503) and b"retry-after" not in names:
                headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
            message = {**message, "headers": headers}
        await send(message)

    return send_with_headers


async def _reject(send: Callable, status: int, message: str, anthropic: bool, code: str | None = None,
                  close: bool = False) -> None:
    if anthropic:
        from ondo.server.protocol_anthropic import anthropic_error_body

        payload = anthropic_error_body(status, message)
    else:
        payload = error_body(status, message, code=code)
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:  # the unread rest of the body must not be taken for the next request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers: from the connection's
    start, and again after each response (keep-alive), the client has `request_timeout_s` to send
    a complete request head, else the connection is closed. uvicorn itself only times out a
    connection that is silent between requests; one that trickles bytes would stay forever."""

    request_timeout_s: float = ServerLimits.request_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._head_awaited_after:   # a new request's head arrived
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()
        # A pipelined request may have started inside the call: its head is complete already.
        if self.cycle is finished and not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._head_awaited_after = self.cycle
        self._header_deadline = self.loop.call_later(self.request_timeout_s, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        handle = getattr(self, "_header_deadline", None)
        if handle is not None:
            handle.cancel()
        self._header_deadline = None
        self._head_awaited_after = self.cycle

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        idle = self.cycle is None or self.cycle.response_complete
        if self.cycle is self._head_awaited_after and idle and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(request_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's `http=` option, with this server's header deadline."""
    return type("ServerH11Protocol", (GuardedH11Protocol,), {"request_timeout_s": request_timeout_s})
