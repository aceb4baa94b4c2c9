"""POST /v1/messages through the official `anthropic` client, against a real server started with
an API key (sent as x-api-key): the answer is the chat completion of the same conversation, the
stream has Anthropic's events, and errors have Anthropic's shape."""
from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from live_server import live_server, sse_events
from ondo.outputs import CompletionOutput
from ondo.server.serving_messages import stop_reason_of

MODEL = "tiny"
KEY = "s3cret"
QUESTION = [{"role": "user", "content": "Tell me about mountains"}]
# The anthropic client (2.x) no longer types the sampling fields; the API still takes them.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_engine):
    with live_server(tmp_path_factory.mktemp("anthropic"), tiny_engine, api_key=KEY,
                     served_model_name=MODEL) as server:
        yield server


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def chat_text(chat, messages: list[dict], max_tokens: int) -> str:
    return chat.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                        temperature=0).choices[0].message.content


def prompt_length(server, **body) -> int:
    response = httpx.post(f"{server.url}/tokenize", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    return len(response.json()["tokens"])


def test_message_answers_like_chat_completions(claude, chat, server):
    message = claude.messages.create(model=MODEL, max_tokens=8, system="Be brief.", messages=QUESTION, **GREEDY)
    messages = [{"role": "system", "content": "Be brief."}, *QUESTION]
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.content[0].type == "text" and message.content[0].text == chat_text(chat, messages, 8)
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.input_tokens == prompt_length(server, messages=messages)
    assert message.usage.output_tokens == 8


def test_text_blocks_equal_strings(claude):
    as_strings = claude.messages.create(model=MODEL, max_tokens=6, system="Be brief.", messages=QUESTION, **GREEDY)
    as_blocks = claude.messages.create(
        model=MODEL, max_tokens=6, **GREEDY, system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Tell me about "},
                                               {"type": "text", "text": "mountains"}]}])
    assert as_blocks.content[0].text == as_strings.content[0].text


def test_top_k_and_top_p_reach_the_sampler(claude):
    greedy = claude.messages.create(model=MODEL, max_tokens=8, messages=QUESTION, **GREEDY)
    # Sampling at temperature 1 from one candidate (top_k=1) or a tiny nucleus is the greedy choice.
    for options in ({"top_k": 1}, {"top_p": 1e-9}):
        sampled = claude.messages.create(model=MODEL, max_tokens=8, messages=QUESTION,
                                         extra_body={"temperature": 1.0, **options})
        assert sampled.content[0].text == greedy.content[0].text


def test_stop_sequence_ends_the_answer(claude):
    whole = claude.messages.create(model=MODEL, max_tokens=12, messages=QUESTION, **GREEDY).content[0].text
    start = next(i for i in range(1, len(whole) - 1) if whole.find(whole[i:i + 2]) == i)
    stop = whole[start:start + 2]
    message = claude.messages.create(model=MODEL, max_tokens=12, messages=QUESTION, **GREEDY,
                                     stop_sequences=["never there", stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == whole[:start]


def test_final_assistant_turn_is_continued(claude, server):
    messages = [*QUESTION, {"role": "assistant", "content": "Mountains are"}]
    message = claude.messages.create(model=MODEL, max_tokens=4, messages=messages, **GREEDY)
    assert message.usage.input_tokens == prompt_length(server, messages=messages, add_generation_prompt=False,
                                                       continue_final_message=True)


def test_stream_has_anthropics_events_and_the_same_text(claude, server):
    whole = claude.messages.create(model=MODEL, max_tokens=10, messages=QUESTION, **GREEDY)
    with claude.messages.stream(model=MODEL, max_tokens=10, messages=QUESTION, **GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == whole.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 10

    body = {"model": MODEL, "max_tokens": 10, "messages": QUESTION, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, headers={"x-api-key": KEY}) as response:
        events = list(sse_events(response))
    kinds = [e["type"] for e in events]
    deltas = kinds.count("content_block_delta")
    assert deltas > 1 and kinds == (["message_start", "content_block_start", "ping"] + ["content_block_delta"] * deltas
                                    + ["content_block_stop", "message_delta", "message_stop"])
    assert events[0]["message"]["usage"]["input_tokens"] == whole.usage.input_tokens
    assert events[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}


def test_stop_reasons_map_from_finish_reasons():
    def finished(reason: str, stop: int | str | None) -> CompletionOutput:
        return CompletionOutput(0, "x", [1], None, None, finish_reason=reason, stop_reason=stop)

    assert stop_reason_of(finished("stop", None)) == ("end_turn", None)        # EOS / end of turn
    assert stop_reason_of(finished("stop", 7)) == ("end_turn", None)           # a stop token id
    assert stop_reason_of(finished("stop", "\n\n")) == ("stop_sequence", "\n\n")
    assert stop_reason_of(finished("length", None)) == ("max_tokens", None)


@pytest.mark.parametrize("body, fragment", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]},
     "messages[0].content[0] has type 'image'"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "'tools' is not supported"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "'thinking' is not supported"),
    ({"top_k": 0}, "top_k must be -1 (off) or >= 1, got 0"),
    ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
])
def test_bad_requests_get_anthropics_error_shape(claude, body, fragment):
    request = {"model": MODEL, "max_tokens": 4, "messages": QUESTION, **body}
    typed = {k: v for k, v in request.items() if k != "top_k"}
    with pytest.raises(anthropic.BadRequestError) as caught:   # top_k goes as an extra field
        claude.messages.create(**typed, extra_body={k: v for k, v in request.items() if k == "top_k"})
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"
    assert fragment in caught.value.body["error"]["message"]


def test_malformed_body_gets_anthropics_error_shape(server):
    headers = {"x-api-key": KEY}
    missing = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "messages": QUESTION}, headers=headers)
    assert missing.status_code == 400
    assert missing.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                         "message": "'max_tokens' is required"}}
    broken = httpx.post(f"{server.url}/v1/messages", content=b"{",
                        headers={**headers, "content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_api_key_as_x_api_key_or_bearer(server):
    body = {"model": MODEL, "max_tokens": 2, "messages": QUESTION}
    bearer = httpx.post(f"{server.url}/v1/messages", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200 and bearer.json()["type"] == "message"
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
        refused = httpx.post(f"{server.url}/v1/messages", json=body, headers=headers)
        assert refused.status_code == 401
        assert refused.json() == {"type": "error", "error": {"type": "authentication_error", "message": (
            "a valid API key is required: send the header 'x-api-key: <key>' (or 'Authorization: Bearer <key>')")}}
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(**body)
