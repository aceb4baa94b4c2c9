"""Real servers for the tests: `run_server` (what `ondo serve` runs) in a subprocess on 127.0.0.1.

Shared by tests/server and tests/browser (which puts this folder on sys.path).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

TINY_CONTEXT = 256  # max_model_len the tiny model is served with: oversize prompts stay cheap

_LAUNCH = """
import json, sys
from ondo.config import EngineConfig
from ondo.server import ServerLimits, run_server
a = json.loads(sys.argv[1])
exec(a.get("setup", ""))  # test-only code run before the server starts (fault injection)
run_server(EngineConfig(**a["engine"]), "127.0.0.1", a["port"], a["api_key"], a["max_waiting"], a["name"],
           limits=ServerLimits(**a.get("limits", {})), engine_process=a.get("engine_process", False),
           api_server_count=a.get("api_server_count", 1))
"""


def child_processes(pid: int) -> dict[int, bytes]:
    """pid -> command line of each running process whose parent is `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    def __init__(self, process: subprocess.Popen, url: str, log_path: Path) -> None:
        self.process, self.url, self.log_path = process, url, log_path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, as a process manager stops a server; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the server ignored SIGTERM for {timeout_s} s:\n{self.log_tail()}") from None

    def metrics(self) -> dict[str, float]:
        """The /metrics samples without labels, by name."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics").text
        return {s.name: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if not s.labels}


@contextmanager
def live_server(log_dir: Path, engine: dict, *, api_key: str | None = None, max_waiting: int | None = None,
                served_model_name: str | None = None, startup_timeout_s: float = 300,
                limits: dict | None = None, setup: str = "",
                engine_process: bool = False, api_server_count: int = 1) -> Iterator[LiveServer]:
    """Start a server, wait until /health says 200, stop it with SIGTERM afterwards.
    `limits`: ServerLimits fields; `setup`: Python run in the server process before it starts;
    `engine_process`: `ondo serve --engine-process` (the engine in a process of its own)."""
    port = free_port()
    args = {"engine": engine, "port": port, "api_key": api_key, "max_waiting": max_waiting,
            "name": served_model_name, "limits": limits or {}, "setup": setup,
            "engine_process": engine_process, "api_server_count": api_server_count}
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-c", _LAUNCH, json.dumps(args)], stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    server = LiveServer(process, f"http://127.0.0.1:{port}", log_path)
    try:
        _wait_healthy(server, startup_timeout_s)
        yield server
    finally:
        server.stop()


def _wait_healthy(server: LiveServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"the server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server was not healthy after {timeout_s} s:\n{server.log_tail()}")


def statuses_until_exit(server: LiveServer, timeout_s: float = 15, *, post_completions: bool = False) -> set[int]:
    """HTTP statuses of /health (and of a new completion, with `post_completions`) polled until the
    server process exits or `timeout_s` passes; refused connections are not statuses."""
    statuses: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while server.process.poll() is None and time.monotonic() < deadline:
        try:
            statuses.add(httpx.get(f"{server.url}/health", timeout=2).status_code)
            if post_completions:
                statuses.add(httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=5).status_code)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return statuses


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    """The `data:` payloads of a streamed response: dicts, then the final "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield payload if payload == "[DONE]" else json.loads(payload)
