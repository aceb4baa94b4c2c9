"""A model without a tokenizer (token ids in, token ids out, as benchmarks serve dummy weights) still
streams one chunk per generated token (with empty text), so a client can time the first token and
the gaps between tokens; before, such a model sent a single chunk at the end."""
from __future__ import annotations

import httpx

from live_server import live_server, sse_events


def test_a_model_without_a_tokenizer_streams_one_chunk_per_token(tmp_path, tiny_llama):
    folder, _ = tiny_llama
    with live_server(tmp_path, {"model": str(folder), "max_model_len": 64}) as server:
        body = {"model": server_model(server), "prompt": [1, 2, 3, 4], "max_tokens": 6, "stream": True,
                "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            events = list(sse_events(response))
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1] if e["choices"]]
        assert len(chunks) == 6, chunks                       # one per token, not one at the end
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def server_model(server) -> str:
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
