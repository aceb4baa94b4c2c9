"""ondo's OpenAI-compatible HTTP server and web playground.

`run_server` is what `ondo serve` calls. The server listens at once and loads the model in the
background (/health: 503, then 200). SIGTERM or Ctrl+C stop accepting connections, abort the
running requests (their streams end with finish_reason "abort") and exit with status 0.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

import uvicorn

from ondo.config import EngineConfig
from ondo.engine.async_engine import AsyncEngine

logger = logging.getLogger("ondo")

__all__ = ["run_server"]


class _Server(uvicorn.Server):
    """uvicorn's server that also aborts the running requests when asked to exit, so open streams
    end now instead of holding the shutdown until they finish."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine) -> None:
        super().__init__(config)
        self._engine = engine

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._engine.abort_all()


def run_server(engine_config: EngineConfig, host: str, port: int, api_key: str | None,
               max_waiting: int | None, served_model_name: str | None, *,
               tool_call_parser: str | None = None, reasoning_parser: str | None = None) -> None:
    """Serve `engine_config`'s model until SIGTERM/SIGINT; exits 1 if the model fails to load.
    tool_call_parser / reasoning_parser: None or "auto" = chosen from the chat template."""
    from ondo.server.app import create_app

    if max_waiting is None:
        max_waiting = engine_config.max_waiting
    if max_waiting is not None and max_waiting < 1:
        raise ValueError(f"max_waiting must be >= 1 (or None for no bound), got {max_waiting}")
    engine = AsyncEngine.from_config(engine_config, max_waiting=max_waiting)
    app = create_app(engine, served_model_name=served_model_name, api_key=api_key or None,
                     tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser)
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                    timeout_graceful_shutdown=10), engine)

    def stop_if_load_failed() -> None:
        engine.wait_until_loaded()
        if engine.load_error is not None:
            server.should_exit = True

    threading.Thread(target=stop_if_load_failed, name="ondo-load-watch", daemon=True).start()
    # uvicorn re-raises the stop signal once it has shut down, to let the previous handler act;
    # a no-op handler makes a graceful stop exit with status 0 instead of dying by the signal.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if engine.load_error is not None:
        logger.error("the model failed to load: %s", engine.load_error)
        sys.exit(1)


def _ignore(sig: int, frame: FrameType | None) -> None:
    pass
