"""tools / tool_choice without a server: the plan (grammar, parser), bad requests, and the
conversation with past calls and tool results rendered through the chat template."""
from __future__ import annotations

import json

import pytest
from chat_templates import QWEN3_STYLE

from ondo.cli.options import build_parser
from ondo.server.errors import APIError
from ondo.server.params import chat_prompt_ids
from ondo.server.protocol import ChatCompletionRequest
from ondo.server.tool_choice import plan_tools
from ondo.tokenizer.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time"}}]
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


def chat_request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": CONVERSATION, **fields})


def rejects(fields: dict, param: str, message: str) -> None:
    with pytest.raises(APIError) as error:
        plan_tools(chat_request(**fields), QWEN3_STYLE, "hermes")
    assert error.value.status == 400 and error.value.param == param and message in str(error.value)


def test_required_and_named_choices_become_grammars():
    required = plan_tools(chat_request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False),
                          QWEN3_STYLE, "hermes")
    schema = required.structured.json
    assert schema["maxItems"] == 1 and [i["properties"]["name"]["enum"] for i in schema["items"]["anyOf"]] == [
        ["get_weather"], ["get_time"]]
    named = plan_tools(chat_request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}),
                       QWEN3_STYLE, "hermes")
    assert named.structured.json == TOOLS[0]["function"]["parameters"]
    auto = plan_tools(chat_request(tools=TOOLS), QWEN3_STYLE, "hermes")
    assert auto.structured is None and auto.parser is not None and not auto.describe_in_system
    none = plan_tools(chat_request(tools=TOOLS, tool_choice="none"), QWEN3_STYLE, "hermes")
    assert none.tools is None and none.parser is None


def test_bad_tool_requests_are_400s_naming_the_field():
    rejects({"tool_choice": "required"}, "tool_choice", "tool_choice 'required' needs tools")
    rejects({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
            "names the function 'nope', which is not among the tools (get_weather, get_time)")
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 3, "maximum": 1}}, "required": ["n"]}}}]
    rejects({"tools": bad, "tool_choice": "required"}, "tools",
            "tools is not a usable JSON schema: Unsatisfiable schema")
    with pytest.raises(ValueError, match="arguments"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "f"}}]}]})


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer_dir):
    return (load_tokenizer(smollm2_tokenizer_dir, chat_template=QWEN3_STYLE),
            load_tokenizer(smollm2_tokenizer_dir))   # SmolLM2's own template knows no tools


def test_calls_and_results_round_trip_through_a_template_with_tools(tokenizers):
    tokenizer = tokenizers[0]
    body = chat_request(tools=TOOLS)
    text = tokenizer.decode(chat_prompt_ids(body, tokenizer, plan_tools(body, QWEN3_STYLE, "hermes")),
                            skip_special_tokens=False)
    assert json.dumps(TOOLS[0]) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n")


def test_a_template_without_tools_gets_them_described_in_hermes_format(tokenizers):
    tokenizer = tokenizers[1]
    body = chat_request(tools=TOOLS)
    plan = plan_tools(body, tokenizer.chat_template, "hermes")
    assert plan.describe_in_system
    text = tokenizer.decode(chat_prompt_ids(body, tokenizer, plan), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n# Tools") and json.dumps(TOOLS[1]) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}' not in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>" in text


def test_serve_flags_choose_the_parsers(monkeypatch):
    import ondo.cli
    import ondo.server

    args = build_parser().parse_args(["serve", "--tool-call-parser", "mistral", "--reasoning-parser", "none"])
    assert (args.tool_call_parser, args.reasoning_parser) == ("mistral", "none")
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.tool_call_parser, defaults.reasoning_parser) == ("auto", "auto")
    seen = {}
    monkeypatch.setattr(ondo.server, "run_server", lambda *a, **k: seen.update(k))
    assert ondo.cli.main(["serve", "--tool-call-parser", "llama3_json", "--reasoning-parser", "qwen3"]) == 0
    assert {k: seen[k] for k in ("tool_call_parser", "reasoning_parser")} == \
        {"tool_call_parser": "llama3_json", "reasoning_parser": "qwen3"}
    with pytest.raises(SystemExit) as error:
        build_parser().parse_args(["serve", "--reasoning-parser", "o1"])
    assert error.value.code == 2
