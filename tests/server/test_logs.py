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
