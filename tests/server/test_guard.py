"""What the server refuses before any route runs, against a real server: a missing API key before
the body is read, bodies over the cap (413), clients too slow to send their headers or body,
connections over the cap; and what every answer carries (X-Request-Id, Retry-After, no-cache)."""
from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest

from live_server import live_server

KEY = "guard-key"
CAP = 64 * 1024
LIMITS = {"max_request_body_bytes": CAP, "request_timeout_s": 1.5, "limit_concurrency": 8}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_engine):
    with live_server(tmp_path_factory.mktemp("guard"), tiny_engine, api_key=KEY, served_model_name="tiny",
                     limits=LIMITS) as server:
        yield server


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data) < _expected_size(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _expected_size(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return 0


def head(path: str, content_length: int, key: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {content_length}\r\n\r\n").encode()


def test_a_missing_key_is_refused_before_the_body_is_read(guarded):
    # The client announces 200 MB and sends none of it: the 401 must come anyway, at once.
    with connect(guarded) as sock:
        sock.sendall(head("/v1/completions", 200 * 1024 * 1024))
        started = time.monotonic()
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert time.monotonic() - started < 1.0
    assert b"invalid_api_key" in answer


def test_a_declared_body_over_the_cap_is_413_in_openais_shape(guarded):
    with connect(guarded) as sock:
        sock.sendall(head("/v1/completions", CAP + 1, key=KEY))
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"--max-request-body-bytes" in answer


def test_a_chunked_body_is_cut_at_the_cap(guarded):
    def chunks():
        for _ in range(100):  # 100 x 16 KiB, well over the 64 KiB cap; never all sent
            yield b"x" * 16384

    response = httpx.post(f"{guarded.url}/v1/completions", content=chunks(), timeout=10,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" or error["code"] == 413
    assert str(CAP) in error["message"]


def test_a_body_under_the_cap_still_works(guarded):
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0)
    completion = client.completions.create(model="tiny", prompt="hello " * 100, max_tokens=2)
    assert completion.choices[0].text is not None


def test_headers_sent_byte_by_byte_are_dropped_after_the_request_timeout(guarded):
    request = head("/v1/completions", 2, key=KEY) + b"{}"
    started = time.monotonic()
    closed_after = None
    with connect(guarded) as sock:
        sock.settimeout(0.2)
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except socket.timeout:
                continue
            except OSError:
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "the slow client was never dropped"
    assert LIMITS["request_timeout_s"] <= closed_after < LIMITS["request_timeout_s"] + 2


def test_a_body_that_stops_arriving_is_408(guarded):
    with connect(guarded) as sock:
        sock.sendall(head("/v1/completions", 100, key=KEY) + b'{"prompt": ')
        started = time.monotonic()
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < LIMITS["request_timeout_s"] + 2


def test_connections_over_the_cap_get_503(guarded):
    idle = [connect(guarded) for _ in range(LIMITS["limit_concurrency"] + 1)]
    try:
        time.sleep(0.2)
        response = httpx.get(f"{guarded.url}/health", timeout=5)
        assert response.status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while httpx.get(f"{guarded.url}/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the server did not recover after the connections closed"
        time.sleep(0.1)


def test_every_answer_carries_a_request_id_and_logs_name_it(guarded):
    mine = httpx.get(f"{guarded.url}/health", headers={"X-Request-Id": "probe-123"})
    assert mine.headers["x-request-id"] == "probe-123"
    generated = httpx.get(f"{guarded.url}/health", headers={"X-Request-Id": "bad id\twith spaces" * 20})
    assert generated.headers["x-request-id"] not in ("", "bad id\twith spaces" * 20)
    refused = httpx.post(f"{guarded.url}/v1/completions", json={})
    assert refused.status_code == 401 and len(refused.headers["x-request-id"]) == 32
    deadline = time.monotonic() + 5
    while "request_id=probe-123" not in guarded.log_tail(20000):
        assert time.monotonic() < deadline, guarded.log_tail()
        time.sleep(0.1)


def test_echoed_values_are_truncated(guarded):
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="m" * 50_000, prompt="x", max_tokens=1)
    message = missing.value.body["message"]
    assert len(message) < 400 and "m" * 200 + "…" in message


def test_streams_are_not_cached(guarded):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{guarded.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-request-id"]
