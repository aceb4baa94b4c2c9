"""POST /v1/responses through the official `openai` client's `client.responses`, against a real
server: the answer is the chat completion of the same conversation, streamed with the Responses
events, and previous_response_id continues a stored conversation."""
from __future__ import annotations

import httpx
import openai
import pytest

from ondo.server.errors import APIError
from ondo.server.serving_responses import ResponseStore, StoredResponse
from ondo.server.protocol_responses import ResponseObject

MODEL = "tiny"
GREEDY = {"temperature": 0}


def chat_text(client, messages: list[dict], max_tokens: int) -> str:
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, **GREEDY)
    return response.choices[0].message.content


def prompt_length(url: str, messages: list[dict]) -> int:
    return len(httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["tokens"])


def test_text_input_answers_like_chat_completions(client, tiny_server):
    response = client.responses.create(model=MODEL, input="Tell me about rivers", max_output_tokens=8, **GREEDY)
    messages = [{"role": "user", "content": "Tell me about rivers"}]
    assert response.object == "response" and response.model == MODEL
    assert response.output_text == chat_text(client, messages, 8) and response.output_text
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    # Random weights never end on their own within 8 tokens: the length limit ends it.
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == prompt_length(tiny_server.url, messages)
    assert response.usage.output_tokens == 8
    assert response.usage.total_tokens == response.usage.input_tokens + 8


def test_message_list_and_instructions(client, tiny_server):
    items = [{"role": "user", "content": "Hi"},
             {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",   # an output item
              "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a colour"}]}]
    response = client.responses.create(model=MODEL, input=items, instructions="Answer in one word.",
                                       max_output_tokens=6, **GREEDY)
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour"}]
    assert response.output_text == chat_text(client, messages, 6)
    assert response.instructions == "Answer in one word."
    assert response.usage.input_tokens == prompt_length(tiny_server.url, messages)


def test_top_p_and_temperature_reach_the_sampler(client):
    greedy = client.responses.create(model=MODEL, input="Once", max_output_tokens=8, **GREEDY).output_text
    # Sampling at temperature 1 from a nucleus this small can only take the most likely token.
    nucleus = client.responses.create(model=MODEL, input="Once", max_output_tokens=8, temperature=1.0, top_p=1e-9)
    assert nucleus.output_text == greedy and nucleus.temperature == 1.0 and nucleus.top_p == 1e-9


def test_stream_sends_the_responses_events_in_order(client):
    options = dict(model=MODEL, input="Write a line", max_output_tokens=10, **GREEDY)
    whole = client.responses.create(**options)
    events = list(client.responses.create(stream=True, **options))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 1
    assert kinds == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * deltas
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.incomplete"])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == whole.output_text == events[-4].text
    assert events[-1].response.output_text == whole.output_text
    assert events[0].response.status == "in_progress" and events[-1].response.status == "incomplete"


def test_stream_that_ends_by_itself_completes(client):
    whole = client.responses.create(model=MODEL, input="Write a line", max_output_tokens=12, **GREEDY).output_text
    # A stop string taken from the answer itself (ondo's extra field): the answer ends before it.
    start = next(i for i in range(1, len(whole) - 1) if whole.find(whole[i:i + 2]) == i)
    stop = whole[start:start + 2]
    events = list(client.responses.create(model=MODEL, input="Write a line", max_output_tokens=12, stream=True,
                                          extra_body={"stop": [stop]}, **GREEDY))
    assert events[-1].type == "response.completed" and events[-1].response.status == "completed"
    assert events[-1].response.output_text == whole[:start]
    assert events[-1].response.incomplete_details is None


def test_previous_response_id_continues_the_conversation(client, tiny_server):
    first = client.responses.create(model=MODEL, input="My name is Ondo.", instructions="Be kind.",
                                    max_output_tokens=4, **GREEDY)
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=5, **GREEDY)
    # Instructions are not carried over (as in OpenAI's API); the earlier turns are.
    messages = [{"role": "user", "content": "My name is Ondo."}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "What is my name?"}]
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == prompt_length(tiny_server.url, messages)
    assert second.output_text == chat_text(client, messages, 5)
    assert client.responses.retrieve(first.id).output_text == first.output_text


def test_unknown_or_unstored_previous_response_is_404(client):
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    for response_id in (unstored.id, "resp_never"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.create(model=MODEL, input="Again", previous_response_id=response_id)
        error = caught.value.body
        assert error["param"] == "previous_response_id" and response_id in error["message"]
        assert "most recently used responses" in error["message"]


def test_the_store_forgets_the_least_recently_used():
    store = ResponseStore(capacity=2)
    for name in ("a", "b"):
        store.put(StoredResponse(ResponseObject(id=name, status="completed", model=MODEL), []))
    store.get("a")   # "b" is now the least recently used
    store.put(StoredResponse(ResponseObject(id="c", status="completed", model=MODEL), []))
    assert len(store) == 2 and store.get("a").response.id == "a" and store.get("c").response.id == "c"
    with pytest.raises(APIError) as caught:
        store.get("b", "previous_response_id")
    assert caught.value.status == 404 and caught.value.param == "previous_response_id"


@pytest.mark.parametrize("extra, fragment, param", [
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "'tools' is not supported", "tools"),
    ({"reasoning": {"effort": "high"}}, "'reasoning' is not supported", "reasoning"),
    ({"text": {"format": {"type": "json_object"}}}, "'text' is not supported", "text"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input[0].content[0] must be", "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
     "input[0] has type 'function_call_output'", "input"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role must be one of", "input"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5", "top_p"),
    ({"max_output_tokens": 0}, "max_output_tokens must be >= 1, got 0", "max_output_tokens"),
    ({"max_output_tokens": 10_000}, "set max_output_tokens to at most", "max_output_tokens"),
])
def test_unsupported_or_bad_fields_are_400_naming_them(tiny_server, extra, fragment, param):
    response = httpx.post(f"{tiny_server.url}/v1/responses", json={"model": MODEL, "input": "Hi", **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == param


def test_docs_and_playground_name_every_dialect(tiny_server):
    paths = httpx.get(f"{tiny_server.url}/openapi.json").json()["paths"]
    assert paths["/v1/responses"]["post"]["tags"] == ["OpenAI Responses"]
    assert paths["/v1/messages"]["post"]["tags"] == ["Anthropic Messages"]
    assert all(paths[p]["post"]["summary"] for p in ("/v1/responses", "/v1/messages"))
    page = httpx.get(f"{tiny_server.url}/").text
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"):
        assert f"<code>{path}</code>" in page
