"""ondo's OpenAI-compatible HTTP server and web playground.

`run_server` is what `ondo serve` calls. The server listens at once and loads the model in the
background (/health: 503, then 200). SIGTERM or Ctrl+C: from that moment new requests get a 503
(with Retry-After) and the listening socket closes; requests in flight may finish within
`ServerLimits.shutdown_timeout_s`, then the rest are aborted (their streams end with finish_reason
"abort"), and the process exits with status 0. If the engine fails fatally, /health and new
requests get 503, open streams end with an error event, and the process exits with status 1 (so a
supervisor restarts it). `api_server_count` > 1 runs that many API server processes over one
engine core (ondo/server/api_servers.py).
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from ondo.config import EngineConfig
from ondo.engine.async_engine import AsyncEngine
from ondo.server.guard import ServerLimits, guarded_protocol
from ondo.server.logs import install_log_guards, uvicorn_log_config

logger = logging.getLogger("ondo")

__all__ = ["ServerLimits", "run_server"]

EXIT_ENGINE_FAILED = 1
_ABORT_MARGIN_S = 5.0   # after aborting, what uvicorn leaves streams to send their last events


class _Server(uvicorn.Server):
    """uvicorn's server that, when asked to exit, first refuses new work (503), then lets the
    requests in flight finish for `drain_s` and aborts what is left, so every open stream ends
    with a proper last event before uvicorn's own graceful timeout cancels anything."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, state, drain_s: float,
                 on_exit: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._engine, self._state, self._drain_s, self._on_exit = engine, state, drain_s, on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._state.draining = True
        if self._on_exit is not None:   # the other API server processes drain too
            self._on_exit()
        super().handle_exit(sig, frame)
        if self._drain_s <= 0:
            self._engine.abort_all()
        else:
            timer = threading.Timer(self._drain_s, self._engine.abort_all)
            timer.daemon = True
            timer.start()


def _exit_now(status: int) -> None:
    """End the process without the interpreter's shutdown, the logs and output flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_server(engine_config: EngineConfig, host: str, port: int, api_key: str | None,
               max_waiting: int | None, served_model_name: str | None, *,
               tool_call_parser: str | None = None, reasoning_parser: str | None = None,
               limits: ServerLimits | None = None, engine_process: bool = False, api_server_count: int = 1,
               attach: tuple | None = None, sock: socket.socket | None = None) -> None:
    """Serve `engine_config`'s model until SIGTERM/SIGINT; exits 1 if the model fails to load or
    the engine fails later. tool_call_parser / reasoning_parser: None or "auto" = chosen from the
    chat template. `limits`: body size, timeouts, connection cap, shutdown drain (ServerLimits).
    `engine_process`: run the engine in a process of its own (ondo.engine.core) instead of a thread.
    `api_server_count`: API server processes over that one engine process (implies it).
    `attach` (CoreAddresses, index) and `sock`: how API server process index > 0 is started."""
    from ondo.server.app import create_app

    limits = limits or ServerLimits()
    if not isinstance(api_server_count, int) or api_server_count < 1:
        raise ValueError(f"api_server_count must be >= 1, got {api_server_count!r}")
    if max_waiting is None:
        max_waiting = engine_config.max_waiting
    if max_waiting is not None and max_waiting < 1:
        raise ValueError(f"max_waiting must be >= 1 (or None for no bound), got {max_waiting}")
    helpers = None
    if attach is not None or api_server_count > 1:
        from ondo.engine.core.client import CoreAddresses, EngineCoreClient

        addresses, index = attach or (CoreAddresses.in_new_folder(api_server_count), 0)
        if attach is None:   # the API server processes started below count into the same files
            from ondo.server.metrics import share_between_processes

            metrics_folder = Path(addresses.folder) / "metrics"
            metrics_folder.mkdir()
            share_between_processes(str(metrics_folder))
        engine = EngineCoreClient(engine_config, max_waiting, addresses, index, freeze_heap=True)
        if attach is None:
            from ondo.server.api_servers import ApiServerGroup, listening_socket, server_options

            sock = listening_socket(host, port)
            helpers = ApiServerGroup.start(api_server_count, sock, addresses, engine_config, server_options(
                limits, host=host, port=port, api_key=api_key, max_waiting=max_waiting,
                served_model_name=served_model_name, tool_call_parser=tool_call_parser,
                reasoning_parser=reasoning_parser))
            # They drain their own streams; the core stops only once they are gone.
            engine.before_shutdown = lambda: helpers.wait(limits.shutdown_timeout_s + _ABORT_MARGIN_S + 5)
    elif engine_process:
        from ondo.engine.core.client import EngineCoreClient

        engine = EngineCoreClient.from_config(engine_config, max_waiting=max_waiting, freeze_heap=True)
    else:
        engine = AsyncEngine.from_config(engine_config, max_waiting=max_waiting, freeze_heap=True)
    app = create_app(engine, served_model_name=served_model_name, api_key=api_key or None,
                     tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser, limits=limits,
                     accept_once_loaded=attach is not None)
    _raise_open_file_limit()
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", log_config=uvicorn_log_config(),
        http=guarded_protocol(limits.request_timeout_s), timeout_keep_alive=limits.timeout_keep_alive_s,
        limit_concurrency=limits.limit_concurrency,
        timeout_graceful_shutdown=int(limits.shutdown_timeout_s + _ABORT_MARGIN_S + 0.999))
    install_log_guards()
    server = _Server(config, engine, app.state.ondo, limits.shutdown_timeout_s,
                     on_exit=helpers.terminate if helpers is not None else None)
    helper_failure: list[str] = []

    def helper_failed(reason: str) -> None:
        logger.error("%s; stopping the server", reason)
        helper_failure.append(reason)
        server.should_exit = True

    if helpers is not None:
        helpers.watch(helper_failed)

    def stop_if_load_failed() -> None:
        engine.wait_until_loaded()
        if engine.load_error is not None:
            server.should_exit = True

    def exit_if_engine_dies() -> None:
        engine.wait_until_loaded()
        if engine.load_error is None and engine.wait_until_dead():
            # The streams got their error events; a second lets them reach the clients.
            timer = threading.Timer(1.0, _set_should_exit, (server,))
            timer.daemon = True
            timer.start()

    threading.Thread(target=stop_if_load_failed, name="ondo-load-watch", daemon=True).start()
    threading.Thread(target=exit_if_engine_dies, name="ondo-engine-watch", daemon=True).start()
    # uvicorn re-raises the stop signal once it has shut down, to let the previous handler act;
    # a no-op handler makes a graceful stop exit with status 0 instead of dying by the signal.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if isinstance(engine, AsyncEngine) and not engine.wait_until_loaded(0):
        # Stopped while the model loads in this process. The load cannot be interrupted, and ending the
        # interpreter while its thread is inside a torch call aborts the process (std::terminate).
        logger.info("stopped while the model was loading")
        _exit_now(0)
    if engine.load_error is not None:
        logger.error("the model failed to load: %s", engine.load_error)
        sys.exit(1)
    if engine.dead_error is not None:
        logger.error("exiting because the engine failed: %s", engine.dead_error)
        sys.exit(EXIT_ENGINE_FAILED)
    if helper_failure:
        sys.exit(EXIT_ENGINE_FAILED)


def _set_should_exit(server: uvicorn.Server) -> None:
    server.should_exit = True


def _raise_open_file_limit() -> None:
    """Many clients need many sockets: use the hard limit on open files, not the soft one."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else
                                                        max(soft, 65536), hard))
    except (ValueError, OSError):
        pass


def _ignore(sig: int, frame: FrameType | None) -> None:
    pass
