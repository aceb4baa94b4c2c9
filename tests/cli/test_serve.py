"""`ondo serve` passes its options to the server: name, API key, context; SIGTERM stops it cleanly."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.cli.conftest import ENV, REPO


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_uses_its_options_and_stops_on_sigterm(cli_model, tmp_path):
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ondo", "serve", str(cli_model), "--port", str(port), "--api-key", "secret",
             "--served-model-name", "tiny", "--max-model-len", "256", "--max-waiting", "4"],
            stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        auth = {"Authorization": "Bearer secret"}
        assert httpx.get(f"{url}/v1/models").status_code == 401
        models = httpx.get(f"{url}/v1/models", headers=auth).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        too_long = httpx.post(f"{url}/v1/completions", headers=auth, timeout=60,
                              json={"model": "tiny", "prompt": "word " * 300, "max_tokens": 2})
        assert too_long.status_code == 400, too_long.text   # --max-model-len 256 reached the engine
        reply = httpx.post(f"{url}/v1/completions", headers=auth, timeout=60,
                           json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(60)
    assert status == 0, log.read_text()
