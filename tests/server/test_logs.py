"""The server's log guards: the same message at most once a second (with a count of what was held
back), and the request id on every line logged while a request is served."""
from __future__ import annotations

import logging

from ondo.server.guard import request_id_var
from ondo.server.logs import RateLimitFilter, RequestIdFilter


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def make_logger(name: str, *filters: logging.Filter) -> tuple[logging.Logger, Collect]:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = Collect()
    for f in filters:
        handler.addFilter(f)
    logger.handlers = [handler]
    return logger, handler


def test_a_flood_of_one_message_is_logged_once_a_second_with_a_count(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("ondo.server.logs.time.monotonic", lambda: now[0])
    logger, out = make_logger("test.flood", RateLimitFilter(interval_s=1.0))
    for _ in range(5000):
        logger.error("socket.accept() out of system resource: %s", "listener")
        now[0] += 0.0001   # 5000 messages in 0.5 s
    logger.error("another message")
    now[0] += 1.0
    logger.error("socket.accept() out of system resource: %s", "listener")
    assert out.lines[0] == "socket.accept() out of system resource: listener"
    assert out.lines[1] == "another message"
    assert out.lines[2].startswith("socket.accept() out of system resource: listener (4999 identical messages")
    assert len(out.lines) == 3


def test_lines_logged_while_serving_a_request_name_it():
    logger, out = make_logger("test.request-id", RequestIdFilter())
    logger.info("outside any request")
    token = request_id_var.set("abc123")
    try:
        logger.info("tokenizing %d characters", 5)
    finally:
        request_id_var.reset(token)
    assert out.lines == ["outside any request", "tokenizing 5 characters [request abc123]"]


def test_a_flood_of_access_lines_still_formats_through_uvicorns_access_formatter(monkeypatch):
    """uvicorn's AccessFormatter unpacks record.args (client, method, path, version, status): the
    rate limiter must never replace them, or every access line after a flood raised TypeError."""
    from ondo.server.logs import uvicorn_log_config
    from uvicorn.logging import AccessFormatter

    now = [1000.0]
    monkeypatch.setattr("ondo.server.logs.time.monotonic", lambda: now[0])
    formatter = AccessFormatter(uvicorn_log_config()["formatters"]["access"]["fmt"], use_colors=False)
    lines: list[str] = []

    class Format(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))   # raises if the args were replaced

    logger = logging.getLogger("uvicorn.access")
    saved = logger.handlers, logger.propagate, logger.level
    logger.setLevel(logging.INFO)
    handler = Format()
    handler.addFilter(RateLimitFilter(interval_s=1.0))
    handler.addFilter(RequestIdFilter())
    logger.handlers, logger.propagate = [handler], False
    try:
        for _ in range(3):
            logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/health", "1.1", 200)
            now[0] += 0.01
        now[0] += 1.0
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/health", "1.1", 200)
    finally:
        logger.handlers, logger.propagate = saved[:2]
        logger.setLevel(saved[2])
    assert len(lines) == 2 and all('"GET /health HTTP/1.1" 200' in line for line in lines), lines
