"""Nothing heavy runs on the event loop: while a multi-megabyte prompt is tokenized (and refused
for its length), /health keeps answering at once; thousands of bad_words are tokenized off the
engine thread too."""
from __future__ import annotations

import threading
import time

import httpx

MODEL = "tiny"


def health_latencies_while(server, work) -> tuple[list[float], object]:
    """Run `work()` in a thread and time /health every 20 ms until it returns."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", work()))
    latencies = []
    with httpx.Client(timeout=30) as client:
        client.get(f"{server.url}/health")  # the connection is open before the work starts
        thread.start()
        while thread.is_alive():
            started = time.perf_counter()
            assert client.get(f"{server.url}/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    thread.join()
    return latencies, result["value"]


def test_health_answers_while_a_huge_prompt_is_tokenized(tiny_server):
    prompt = "the quick brown fox jumps over the lazy dog. " * 70_000   # ~3 MB, ~700k tokens

    def post():
        return httpx.post(f"{tiny_server.url}/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": prompt, "max_tokens": 1})

    latencies, response = health_latencies_while(tiny_server, post)
    assert response.status_code == 400 and "tokens" in response.json()["error"]["message"]
    assert len(latencies) >= 5, "the tokenization was too quick to observe"
    # The body is parsed as JSON on the loop (milliseconds); the tokenization is not.
    assert sorted(latencies)[-2] < 0.1, latencies
    assert max(latencies) < 0.5, latencies


def test_health_answers_while_a_huge_chat_is_templated(tiny_server):
    messages = [{"role": "user", "content": "lorem ipsum dolor sit amet " * 100_000}]

    def post():
        return httpx.post(f"{tiny_server.url}/v1/chat/completions", timeout=120,
                          json={"model": MODEL, "messages": messages, "max_tokens": 1})

    latencies, response = health_latencies_while(tiny_server, post)
    assert response.status_code == 400, response.text
    assert len(latencies) >= 5
    assert sorted(latencies)[-2] < 0.1, latencies


def test_many_bad_words_do_not_stall_other_streams(tiny_server):
    words = [f"word{i}" for i in range(3000)]
    body = {"model": MODEL, "prompt": "Other stream", "max_tokens": 40, "stream": True, "ignore_eos": True}
    gaps = []
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        banned = threading.Thread(target=lambda: httpx.post(
            f"{tiny_server.url}/v1/completions", timeout=120,
            json={"model": MODEL, "prompt": "x", "max_tokens": 1, "bad_words": words}))
        banned.start()
        last = time.perf_counter()
        for line in lines:
            if line.startswith("data: "):
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
        banned.join()
    assert len(gaps) >= 30
    assert max(gaps) < 1.0, max(gaps)
