"""The server's life: 503 while the model loads, 200 after; SIGTERM ends open streams with
finish_reason "abort" and exits 0; a model that fails to load exits 1."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from live_server import _LAUNCH, free_port, live_server, sse_events


def launch(tmp_path, engine: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = {"engine": engine, "port": port, "api_key": None, "max_waiting": None, "name": None}
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-c", _LAUNCH, json.dumps(args)], stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def test_health_is_503_while_loading_then_200(tmp_path, tiny_engine):
    process, url = launch(tmp_path, tiny_engine)
    try:
        statuses: list[int] = []
        refused_while_loading = 0
        deadline = time.monotonic() + 120
        while (not statuses or statuses[-1] != 200) and time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(f"{url}/health", timeout=2).status_code)
                if statuses[-1] == 503:
                    loading = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
                    if loading.status_code != 200:  # 200: the load finished in between
                        assert loading.status_code == 503, loading.text
                        assert "still loading" in loading.json()["error"]["message"]
                        refused_while_loading += 1
            except httpx.ConnectError:
                pass
            time.sleep(0.05)
        assert statuses[0] == 503 and statuses[-1] == 200
        assert set(statuses) == {503, 200}
        assert refused_while_loading > 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_sigterm_aborts_open_streams_and_exits_0(tmp_path, tiny_engine):
    with live_server(tmp_path, tiny_engine) as server:
        body = {"prompt": "Never ending", "max_tokens": 240, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            events = sse_events(response)
            next(events)
            server.process.send_signal(signal.SIGTERM)
            rest = list(events)
        assert rest[-1] == "[DONE]"
        finish = [c["finish_reason"] for event in rest[:-1] for c in event["choices"] if c["finish_reason"]]
        assert finish == ["abort"]
        assert server.process.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health")


def test_a_model_that_fails_to_load_exits_1(tmp_path):
    process, _ = launch(tmp_path, {"model": str(tmp_path / "no-such-model")})
    assert process.wait(120) == 1
    assert "failed to load" in (tmp_path / "server.log").read_text()
