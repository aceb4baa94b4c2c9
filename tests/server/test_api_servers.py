"""`ondo serve --api-server-count 3`: three API server processes share the port and one engine-core
process. Concurrent requests, streamed or not, with stop strings and n=2, answer as the in-process
server does, whichever process takes them, and /metrics counts them all whichever process answers;
SIGTERM stops every process (exit 0); a dead API server
process makes the first exit 1 with everything stopped; a killed core does the same."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from live_server import child_processes, live_server

pytestmark = pytest.mark.slow

COUNT = 3


def _family(server) -> tuple[list[int], int]:
    children = child_processes(server.process.pid)
    helpers = [pid for pid, cmd in children.items() if b"ondo.server.api_servers" in cmd]
    (core,) = [pid for pid, cmd in children.items() if b"ondo.engine.core.process" in cmd]
    return helpers, core


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pids: list[int], timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(map(_running, pids)):
            return True
        time.sleep(0.1)
    return False


def _complete(url: str, body: dict) -> list[tuple]:
    """(text, finish_reason) per choice: from the whole answer, or assembled from the stream."""
    if not body.get("stream"):
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return [(c["text"], c["finish_reason"]) for c in answer.json()["choices"]]
    import json

    parts: dict[int, list] = {}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:]).get("choices", []):
                    part = parts.setdefault(c["index"], ["", None])
                    part[0] += c["text"]
                    part[1] = c["finish_reason"] or part[1]
    return [tuple(parts[i]) for i in sorted(parts)]


def _requests_finished(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "ondo_requests_finished_total")


def _bodies() -> list[dict]:
    prompts = ["Once upon a time", "The capital of France is", "Hello", "1, 2, 3,"]
    bodies = []
    for i, prompt in enumerate(prompts * 3):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": i % 2 == 1}
        if i % 3 == 1:
            body.update(temperature=1.0, n=2, seed=i)
        if i % 4 == 2:
            body["stop"] = [" ", "e"]
        bodies.append(body)
    return bodies


def test_three_api_servers_answer_as_the_in_process_server_and_stop_together(tmp_path, tiny_engine, tiny_server):
    bodies = _bodies()
    expected = [_complete(tiny_server.url, body) for body in bodies]
    assert any(reason == "stop" for answer in expected for _, reason in answer)
    with live_server(tmp_path, tiny_engine, api_server_count=COUNT) as server:
        helpers, core = _family(server)
        assert len(helpers) == COUNT - 1
        with ThreadPoolExecutor(8) as pool:   # many connections at once: the kernel spreads them
            for _ in range(3):
                assert list(pool.map(lambda body: _complete(server.url, body), bodies)) == expected
            # Every scrape, whichever process answers it, counts the requests of all three.
            scrapes = list(pool.map(lambda _: _requests_finished(server.url), range(12)))
        assert scrapes == [3 * len(bodies)] * 12, scrapes
        assert server.stop() == 0
    assert _gone(helpers + [core]), "an API server or the core outlived SIGTERM"


def test_a_dead_api_server_process_stops_the_server_with_status_1(tmp_path, tiny_engine):
    with live_server(tmp_path, tiny_engine, api_server_count=COUNT) as server:
        helpers, core = _family(server)
        os.kill(helpers[0], signal.SIGKILL)
        assert server.process.wait(30) == 1
        assert "exited with status -9" in server.log_tail()
    assert _gone(helpers + [core])


def test_a_killed_core_stops_every_api_server_with_status_1(tmp_path, tiny_engine):
    with live_server(tmp_path, tiny_engine, api_server_count=COUNT) as server:
        helpers, core = _family(server)
        os.kill(core, signal.SIGKILL)
        assert server.process.wait(30) == 1
    assert _gone(helpers)
