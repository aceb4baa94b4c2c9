"""Tool calls, reasoning output and structured-output errors through a real server (the official
`openai` client), on the tiny random model with a Qwen3-style template (tools, <think>). The
model's own text is noise, so calls come from grammars: a forced tool_choice, or a regex that
writes the Hermes format for the `auto` parser to read."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from chat_templates import QWEN3_STYLE
from live_server import live_server

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                       "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                      "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "KST"]}}, "required": ["zone"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris for 2 days?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    engine = {"model": str(tiny_model_dir), "max_model_len": 512, "chat_template": QWEN3_STYLE}
    with live_server(tmp_path_factory.mktemp("logs"), engine, served_model_name="tiny") as live:
        yield live


@pytest.fixture()
def tools_client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def streamed_message(chunks) -> tuple[dict, str, str | None]:
    """(tool calls by index, content, finish_reason) reassembled from stream chunks as a client does."""
    calls, content, finish = {}, "", None
    for chunk in chunks:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return calls, content, finish


def both_ways(client, **options):
    whole = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=80, **options)
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=80,
                                                 stream=True, **options))
    return whole.choices[0], streamed_message(chunks)


def call_list(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_streamed_and_whole_agree(tools_client, tool_choice):
    # One call at most: on noise, a model free to add calls to the array may never stop.
    choice, (calls, content, finish) = both_ways(tools_client, tools=TOOLS, tool_choice=tool_choice,
                                                 parallel_tool_calls=False)
    assert choice.finish_reason == finish == "tool_calls", choice
    assert choice.message.content is None and content == "" and len(calls) == 1
    assert call_list(choice.message) == [(c["name"], c["arguments"]) for c in calls.values()]
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]


def test_auto_parses_the_models_hermes_format(tools_client):
    forced = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    choice, (calls, content, finish) = both_ways(tools_client, tools=TOOLS, extra_body={"guided_choice": [forced]})
    assert choice.finish_reason == finish == "tool_calls"
    assert call_list(choice.message) == [("get_weather", '{"city": "Paris", "days": 2}')]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == call_list(choice.message)


def test_a_conversation_with_calls_and_results_is_accepted(tools_client):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    response = tools_client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=4,
                                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert response.usage.prompt_tokens > 60


def test_reasoning_content_whole_and_streamed(tools_client):
    # The template opens <think>: all of the tiny model's noise is reasoning until it closes it.
    whole = tools_client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=12)
    message = whole.choices[0].message
    assert message.reasoning_content and not message.content
    chunks = list(tools_client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=12,
                                                       stream=True))
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == \
        message.reasoning_content
    plain = tools_client.chat.completions.create(
        model="tiny", messages=ASK, temperature=0, max_tokens=12,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert plain.choices[0].message.content and getattr(plain.choices[0].message, "reasoning_content", None) is None


@pytest.mark.parametrize("body,param,message", [
    ({"guided_regex": "[a-"}, "guided_regex", "guided_regex is not a valid regex: regex parse error: [a- ^ error: unclosed character class"),
    ({"guided_json": {"type": "foo"}}, "guided_json", "guided_json is not a usable JSON schema: Invalid type: foo"),
    ({"guided_grammar": "root ::= x"}, "guided_grammar", "guided_grammar is not a valid grammar: Rule 'x' not found"),
    ({"guided_choice": []}, "guided_choice", "guided_choice must be a non-empty list of strings"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}}}},
     "response_format", "response_format.json_schema.schema is not a usable JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "response_format.json_schema.schema is required with type json_schema"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     "give one of response_format (json_object / json_schema), guided_json"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice",
     "cannot be combined with response_format or guided_*"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice", "needs tools"),
])
def test_bad_structured_requests_are_400s_naming_the_field(server, body, param, message):
    for path, extra in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "x"})):
        if "tool" in json.dumps(body) and path == "/v1/completions":
            continue
        response = httpx.post(f"{server.url}{path}", json={**extra, **body, "max_tokens": 4})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param and message in error["message"], error


def test_a_constraint_the_vocabulary_cannot_write_is_a_400(server):
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "guided_regex": "\u0004"})
    assert response.status_code == 400 and "vocabulary cannot write" in response.json()["error"]["message"]


# Each fails after its first token, once a streamed response is on its way:
# - a letter the vocabulary writes, then the control byte 4, which no token holds;
# - a regex whose U+B1300 llguidance 1.9.1 allows byte by byte in its mask, then refuses.
FAILING_MIDWAY = [("C\u0004", "the grammar allows no token here"),
                  ("o\u00c8\u00a4;\u00ad\U000b1300~", "this constraint could not be followed")]


@pytest.mark.parametrize("regex,message", FAILING_MIDWAY, ids=["dead-end", "refused"])
def test_a_constraint_that_fails_midway_is_a_400_not_a_server_error(server, regex, message):
    for stream in (False, True):
        response = httpx.post(f"{server.url}/v1/completions", json={
            "prompt": "x", "max_tokens": 16, "stream": stream, "guided_regex": regex})
        if stream:   # the status line went out with the first token: the error is the last event
            events = [json.loads(line[6:]) for line in response.text.splitlines()
                      if line.startswith("data: {")]
            error = events[-1]["error"]
        else:
            assert response.status_code == 400, response.text
            error = response.json()["error"]
        assert error["code"] == 400 and error["type"] == "invalid_request_error", error
        assert message in error["message"], error


def test_completions_take_guided_fields_and_response_format(tools_client):
    regex = tools_client.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=1.0,
                                            extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})
    assert len(regex.choices[0].text) == 6 and regex.choices[0].text[3] == "-"
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    shaped = tools_client.completions.create(model="tiny", prompt="JSON:", max_tokens=20, temperature=0, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    jsonschema.validate(json.loads(shaped.choices[0].text), schema)
