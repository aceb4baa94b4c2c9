"""The server's logging: every line about a request names its id, and no message floods the log.

A client can make the server log the same thing many times a second (a flood of connections when
file descriptors run out makes asyncio log the same traceback on every accept). `RateLimitFilter`
lets one message through per second and per text, and says how many it held back.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any

import uvicorn.config

from ondo.server.guard import request_id_var

_FLOOD_LOGGERS = ("asyncio", "uvicorn", "uvicorn.error", "uvicorn.access", "ondo", "")


class RateLimitFilter(logging.Filter):
    """At most one record per `interval_s` for each (logger, level, message); the next one let
    through says how many were suppressed in between."""

    def __init__(self, interval_s: float = 1.0, max_keys: int = 4096) -> None:
        super().__init__()
        self.interval_s, self.max_keys = interval_s, max_keys
        self._last: dict[tuple, tuple[float, int]] = {}   # key -> (last emitted at, suppressed since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_ondo_rate_checked", False):
            return True  # the same record passing a second handler
        key = (record.name, record.levelno, str(record.msg)[:300], _args_key(record.args))
        now = time.monotonic()
        with self._lock:
            last_s, suppressed = self._last.get(key, (None, 0))
            if last_s is not None and now - last_s < self.interval_s:
                self._last[key] = (last_s, suppressed + 1)
                return False
            if len(self._last) >= self.max_keys:
                self._forget_older_than(now - self.interval_s)
            self._last[key] = (now, 0)
        record._ondo_rate_checked = True
        if suppressed and record.name != "uvicorn.access":   # its formatter unpacks record.args: keep them
            record.msg = f"{record.getMessage()} ({suppressed} identical messages suppressed in the last " \
                         f"{now - last_s:.1f} s)"
            record.args = None
        return True

    def _forget_older_than(self, cutoff_s: float) -> None:
        for key in [k for k, (t, _) in self._last.items() if t < cutoff_s]:
            del self._last[key]
        if len(self._last) >= self.max_keys:
            self._last.clear()


def _args_key(args: Any) -> str:
    # uvicorn's access lines differ only in their arguments (client, path, status).
    return repr(args)[:300] if args else ""


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being served into the record: `request_id` for formats that
    name it (the access log), and at the end of other messages logged while serving it."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        record.request_id = request_id or "-"
        if request_id and record.name != "uvicorn.access" and not getattr(record, "_ondo_id_added", False):
            record.msg = f"{record.getMessage()} [request {request_id}]"
            record.args = None
            record._ondo_id_added = True
        return True


def uvicorn_log_config() -> dict:
    """uvicorn's logging configuration with the request id in each access line."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["access"]["fmt"] = \
        '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s request_id=%(request_id)s'
    config["filters"] = {"request_id": {"()": RequestIdFilter}}
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    return config


def install_log_guards() -> RateLimitFilter:
    """Rate-limit and tag every handler that server logs reach (call after uvicorn set up its
    logging), and the loggers that log on their own (asyncio's accept errors)."""
    limiter = RateLimitFilter()
    tagger = RequestIdFilter()
    if not logging.getLogger().handlers:   # asyncio's errors would reach Python's last resort
        logging.getLogger().addHandler(logging.StreamHandler())
    for name in _FLOOD_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if limiter not in handler.filters:
                handler.addFilter(limiter)
                handler.addFilter(tagger)
    logging.getLogger("asyncio").addFilter(limiter)
    return limiter
