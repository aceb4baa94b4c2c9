"""Several API server processes over one engine core: `ondo serve --api-server-count N`.

One Python process streams only so many tokens a second: HTTP, JSON, detokenizing and SSE for every
token of every stream share its interpreter lock. With N processes, the first (the one `ondo serve`
starts) binds the listening socket, starts the engine core with one pair of addresses per process
(`CoreAddresses`) and N - 1 more API server processes, `python -m ondo.server.api_servers SPEC`, each
handed the listening socket (the kernel spreads new connections over them) and its index. Each
process runs the whole server for the connections it accepts; the core sends each process the
outputs of its own requests and the same engine facts and gauges to all.

Life cycle: SIGTERM (or Ctrl+C) on the first process reaches the others; each drains its own
streams; the first waits for them before it stops the core. If one of them dies while serving, the
first exits 1 (a supervisor then restarts the whole server); they exit when the core does. `/metrics`
counts the requests of every process, whichever answers the scrape (Prometheus' multiprocess mode,
in the core folder; ondo/server/metrics.py); the engine's gauges are the core's.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from ondo.config import EngineConfig
from ondo.engine.core.client import CoreAddresses

logger = logging.getLogger("ondo")


def listening_socket(host: str, port: int) -> socket.socket:
    """The socket every API server process accepts on (bound before any of them starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class ApiServerGroup:
    """The API server processes 1 .. N-1, started and watched by the first."""

    def __init__(self, processes: list[subprocess.Popen]) -> None:
        self.processes = processes
        self.stopping = False

    @classmethod
    def start(cls, count: int, sock: socket.socket, addresses: CoreAddresses, config: EngineConfig,
              server_options: dict[str, Any]) -> "ApiServerGroup":
        """Start processes 1 .. count-1. `server_options`: run_server's keyword arguments (plain data)."""
        spec_path = Path(addresses.folder) / "api-servers.json"   # in the core's private (0700) folder
        spec = {"config": msgspec.to_builtins(config), "folder": addresses.folder, "inputs": addresses.inputs,
                "outputs": addresses.outputs, "fd": sock.fileno(), "options": server_options}
        spec_path.write_text(json.dumps(spec))
        processes = []
        for index in range(1, count):
            command = [sys.executable, "-m", "ondo.server.api_servers", str(spec_path), str(index)]
            processes.append(subprocess.Popen(command, pass_fds=(sock.fileno(),)))
        logger.info("%d more API server processes started (pids %s)", count - 1,
                    ", ".join(str(p.pid) for p in processes))
        return cls(processes)

    def terminate(self) -> None:
        """Ask every process to drain and stop (SIGTERM)."""
        self.stopping = True
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> None:
        """Wait for every process to exit; kill what is still running after `timeout_s`."""
        self.terminate()
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("API server process %d did not stop; killing it", process.pid)
                process.kill()
                process.wait()

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """In a daemon thread: call `on_failure` once if a process exits while not stopping."""

        def run() -> None:
            while not self.stopping:
                for process in self.processes:
                    status = process.poll()
                    if status is not None and not self.stopping:
                        on_failure(f"API server process {process.pid} exited with status {status}")
                        return
                time.sleep(0.2)

        threading.Thread(target=run, name="ondo-api-servers-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """An API server process i > 0: the whole server, on the inherited socket, attached to the core."""
    from ondo.server import ServerLimits, run_server

    spec_path, index = (argv or sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    config = msgspec.convert(spec["config"], EngineConfig)
    addresses = CoreAddresses(spec["folder"], tuple(spec["inputs"]), tuple(spec["outputs"]))
    sock = socket.socket(fileno=spec["fd"])
    options = dict(spec["options"])
    options["limits"] = ServerLimits(**options["limits"])
    run_server(config, attach=(addresses, int(index)), sock=sock, **options)
    return 0


def server_options(limits: Any, **options: Any) -> dict[str, Any]:
    """run_server's keyword arguments for the other processes, as plain data."""
    return {**options, "limits": dataclasses.asdict(limits)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
