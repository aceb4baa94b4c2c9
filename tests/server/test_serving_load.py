"""Many clients at once, clients that leave, a full waiting queue, and what /metrics reports."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from live_server import live_server, sse_events
from tests.conftest import run_async

MODEL = "tiny"


def wait_until_idle(server, timeout_s: float = 20) -> dict[str, float]:
    """Poll /metrics until no request runs or waits; returns the last sample."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server.metrics()
        if metrics["ondo_num_requests_running"] == 0 and metrics["ondo_num_requests_waiting"] == 0:
            return metrics
        if time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def aborted_count(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    line = next((l for l in text.splitlines() if l.startswith('ondo_requests_finished_total{finish_reason="abort"}')), None)
    return float(line.split()[-1]) if line else 0.0


@pytest.mark.slow
def test_32_concurrent_streaming_clients_all_finish(async_client, tiny_server):
    async def one(i: int) -> tuple[str | None, str]:
        stream = await async_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Request number {i}"}], max_tokens=16,
            stream=True, extra_body={"ignore_eos": True})
        text, finish = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return finish, text

    async def run_all():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = run_async(run_all())
    assert [finish for finish, _ in results] == ["length"] * 32
    assert all(text for _, text in results)
    metrics = wait_until_idle(tiny_server)
    assert metrics["ondo_kv_cache_free_blocks"] == metrics["ondo_kv_cache_total_blocks"]


def test_client_leaving_mid_stream_frees_its_kv_blocks(tiny_server):
    aborted_before = aborted_count(tiny_server)
    body = {"model": MODEL, "prompt": "A long story:", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = sse_events(response)
        for _ in range(3):
            next(events)
        assert tiny_server.metrics()["ondo_kv_cache_free_blocks"] < tiny_server.metrics()["ondo_kv_cache_total_blocks"]
    # Leaving the block closes the connection mid-stream.
    metrics = wait_until_idle(tiny_server)
    assert metrics["ondo_num_requests_running"] == 0
    assert metrics["ondo_kv_cache_free_blocks"] == metrics["ondo_kv_cache_total_blocks"]
    assert aborted_count(tiny_server) == aborted_before + 1


def test_client_timing_out_on_a_whole_response_aborts_it(tiny_server):
    body = {"model": MODEL, "prompt": "A long story:", "max_tokens": 240, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    metrics = wait_until_idle(tiny_server)
    assert metrics["ondo_num_requests_running"] == 0
    assert metrics["ondo_kv_cache_free_blocks"] == metrics["ondo_kv_cache_total_blocks"]


def test_metrics_count_tokens_and_latencies(client, tiny_server):
    before = tiny_server.metrics()
    response = client.completions.create(model=MODEL, prompt="Metrics please", max_tokens=5,
                                         extra_body={"ignore_eos": True})
    after = tiny_server.metrics()
    assert after["ondo_prompt_tokens_total"] - before.get("ondo_prompt_tokens_total", 0) == response.usage.prompt_tokens
    assert after["ondo_generation_tokens_total"] - before.get("ondo_generation_tokens_total", 0) == 5
    assert after["ondo_time_to_first_token_seconds_count"] - before.get("ondo_time_to_first_token_seconds_count", 0) == 1
    assert after["ondo_time_per_output_token_seconds_count"] - before.get("ondo_time_per_output_token_seconds_count", 0) == 4
    assert 0 <= after["ondo_kv_cache_usage_perc"] <= 1
    assert 0 <= after["ondo_prefix_cache_hit_rate"] <= 1


def finished_counts(server, metric: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{metric}{{"))


def test_finished_requests_are_counted_like_latencies_and_choices_apart(client, tiny_server):
    # One request with 3 choices: one request finished (as the e2e histogram counts), 3 choices.
    before = tiny_server.metrics()
    requests_before = finished_counts(tiny_server, "ondo_requests_finished_total")
    choices_before = finished_counts(tiny_server, "ondo_choices_finished_total")
    client.completions.create(model=MODEL, prompt="Three ways", max_tokens=3, n=3, temperature=1.0)
    after = tiny_server.metrics()
    e2e = after["ondo_e2e_request_latency_seconds_count"] - before.get("ondo_e2e_request_latency_seconds_count", 0)
    assert e2e == 1
    assert finished_counts(tiny_server, "ondo_requests_finished_total") - requests_before == 1
    assert finished_counts(tiny_server, "ondo_choices_finished_total") - choices_before == 3


def test_full_waiting_queue_answers_429(tmp_path, tiny_engine):
    # One running slot and one waiting place: the third concurrent request is refused.
    engine = {**tiny_engine, "max_num_seqs": 1}
    with live_server(tmp_path, engine, max_waiting=1, served_model_name=MODEL) as server:
        body = {"model": MODEL, "prompt": "Busy", "max_tokens": 240, "stream": True, "ignore_eos": True}
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as running:
            events = sse_events(running)  # kept: closing the iterator would close the connection
            next(events)
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as waiting:
                assert waiting.status_code == 200
                assert server.metrics()["ondo_num_requests_waiting"] == 1
                with pytest.raises(openai.RateLimitError) as refused:
                    client.completions.create(model=MODEL, prompt="One more", max_tokens=2)
                assert refused.value.status_code == 429
                assert "waiting queue is full" in refused.value.body["message"]
        metrics = wait_until_idle(server)
        assert metrics["ondo_kv_cache_free_blocks"] == metrics["ondo_kv_cache_total_blocks"]
