"""The server's life: 503 while the model loads, 200 after; on SIGTERM new requests get 503 at once,
open streams may finish within the shutdown timeout and are aborted after it (finish_reason
"abort"), and the process exits 0; a model that fails to load exits 1; an engine that fails while
serving ends the open streams with an error event, turns /health 503 and exits 1."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from live_server import _LAUNCH, free_port, live_server, sse_events, statuses_until_exit


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


def test_sigterm_lets_open_streams_finish_and_refuses_new_work(tmp_path, tiny_engine):
    with live_server(tmp_path, tiny_engine, limits={"shutdown_timeout_s": 60}) as server:
        body = {"prompt": "Drain me", "max_tokens": 40, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=60) as other:
            assert other.get(f"{server.url}/health").status_code == 200  # a kept-alive connection
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
                events = sse_events(response)
                next(events)
                server.process.send_signal(signal.SIGTERM)
                answers = []
                for _ in range(5):   # right after the signal: refused, never accepted or a 500
                    try:
                        answers.append(other.post(f"{server.url}/v1/completions", json={"prompt": "late"}))
                    except httpx.TransportError:
                        answers.append(None)
                    time.sleep(0.02)
                rest = list(events)
        for answer in answers:
            if answer is not None:
                assert answer.status_code == 503, answer.text
                assert answer.headers["retry-after"]
                assert "shutting down" in answer.json()["error"]["message"]
        assert rest[-1] == "[DONE]"
        finish = [c["finish_reason"] for event in rest[:-1] for c in event["choices"] if c["finish_reason"]]
        assert finish == ["length"]
        assert server.process.wait(30) == 0


def test_sigterm_aborts_open_streams_after_the_shutdown_timeout_and_exits_0(tmp_path, tiny_engine):
    with live_server(tmp_path, tiny_engine, limits={"shutdown_timeout_s": 0}) as server:
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


# A load that takes long in native code: the loader thread is inside a torch call (the GIL released)
# when the signal comes, as it is while a large model's weights load.
_SLOW_LOAD = """
import torch
import ondo.engine.engine as engine_module
_init = engine_module.Engine.__init__
def _slow_init(self, *args, **kwargs):
    x = torch.randn(1024, 1024)
    for _ in range(2000):
        x @ x
    _init(self, *args, **kwargs)
engine_module.Engine.__init__ = _slow_init
"""


def test_sigterm_while_the_model_loads_exits_0_at_once(tmp_path, tiny_engine):
    port = free_port()
    args = {"engine": tiny_engine, "port": port, "api_key": None, "max_waiting": None, "name": None,
            "setup": _SLOW_LOAD}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-c", _LAUNCH, json.dumps(args)], stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        status = None
        while status != 503 and time.monotonic() < deadline:   # up, and still loading
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
            except httpx.ConnectError:
                time.sleep(0.05)
        assert status == 503
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        code = process.wait(20)   # the load would take far longer: it is not waited for
    finally:
        process.kill()
    output = log_path.read_text()
    assert code == 0, output[-2000:]
    assert "terminate called" not in output and "stopped while the model was loading" in output


# Test-only fault injection: the server process runs this before it starts (live_server's `setup`),
# so the real Engine.step raises once a marker file exists, like a CUDA error poisoning the device.
_FAULT = """
import os
from ondo.engine.engine import Engine
_step = Engine.step
def _failing_step(self):
    if os.path.exists({marker!r}):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    return _step(self)
Engine.step = _failing_step
"""


def test_an_engine_failure_ends_streams_turns_health_503_and_exits_1(tmp_path, tiny_engine):
    marker = tmp_path / "fail-now"
    with live_server(tmp_path, tiny_engine, setup=_FAULT.format(marker=str(marker))) as server:
        body = {"prompt": "Doomed", "max_tokens": 240, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
            events = sse_events(response)
            next(events)
            marker.touch()
            rest = list(events)
        assert rest[-1] == "[DONE]"
        assert "engine failed" in rest[-2]["error"]["message"]
        statuses = statuses_until_exit(server, post_completions=True)
        assert server.process.wait(15) == 1
        assert statuses <= {503}, statuses
        assert "engine failed" in server.log_tail()


def test_a_model_that_fails_to_load_exits_1(tmp_path):
    process, _ = launch(tmp_path, {"model": str(tmp_path / "no-such-model")})
    assert process.wait(120) == 1
    assert "failed to load" in (tmp_path / "server.log").read_text()
