"""Tool-call and reasoning parsers on model outputs, whole and streamed in every possible chunking:
the streamed deltas must always reassemble to the non-streamed message."""
from __future__ import annotations

import json

import pytest

from ondo.server.chat_output import AnswerParser
from ondo.server.reasoning import ReasoningParser, detect_reasoning_parser, reasoning_parser_for
from ondo.server.tool_parsers import (PARSERS, detect_tool_parser, parse_named, parse_required)

WEATHER = {"city": "Paris", "unit": "celsius"}
CASES = [
    # (parser, model output, expected content, expected [(name, arguments)])
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     None, [("get_weather", WEATHER)]),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
               '{"name": "b", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>',
     "Let me check.\n", [("a", {}), ("b", {"x": [1, {"y": "}"}]})]),
    ("hermes", "No tools needed: 2 < 3 and <b>bold</b>.", "No tools needed: 2 < 3 and <b>bold</b>.", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     None, [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"n": 1}}; {"name": "b", "parameters": {}}',
     None, [("a", {"n": 1}), ("b", {})]),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),   # JSON that is not a call
    ("llama3_json", "Plain text.", "Plain text.", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
     None, [("get_weather", WEATHER)]),
    ("mistral", '[{"name": "a", "arguments": {"q": "x\\"y"}}, {"name": "b", "arguments": {}}]',
     None, [("a", {"q": 'x"y'}), ("b", {})]),   # the tag skipped as a special token
    ("mistral", "[1, 2] is a list.", "[1, 2] is a list.", []),
]


def stream(parser: AnswerParser, text: str, cuts: list[int]) -> dict:
    """Feed `text` in pieces ending at `cuts`, then finish; reassemble the deltas as a client does."""
    content, reasoning, calls = "", "", {}
    for i, end in enumerate(cuts + [len(text)]):
        for delta in parser.deltas(text[:end], final=i == len(cuts)):
            content += delta.get("content", "")
            reasoning += delta.get("reasoning_content", "")
            for call in delta.get("tool_calls", []):
                entry = calls.setdefault(call["index"], {"id": call.get("id"), "name": "", "arguments": ""})
                entry["name"] += call["function"].get("name") or ""
                entry["arguments"] += call["function"].get("arguments", "")
    return {"content": content, "reasoning": reasoning, "calls": [calls[i] for i in sorted(calls)]}


def cuttings(text: str) -> list[list[int]]:
    """Every single cut, one-character chunks, and a few coarse chunkings."""
    return [[i] for i in range(1, len(text))] + [list(range(1, len(text)))] + [list(range(3, len(text), 7))]


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_parsed_whole_and_streamed_alike(name, text, content, calls):
    message = AnswerParser(None, PARSERS[name]).message(text)
    assert message["content"] == (content if content is not None else None)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == calls
    for cuts in cuttings(text):
        parser = AnswerParser(None, PARSERS[name])
        streamed = stream(parser, text, cuts)
        final = parser.message(text)
        assert streamed["content"] == (final["content"] or "")
        assert [(c["name"], c["arguments"], c["id"]) for c in streamed["calls"]] == [
            (c["function"]["name"], c["function"]["arguments"], c["id"]) for c in final["tool_calls"]]


def test_forced_formats_required_and_named():
    text = '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, {"name": "f", "parameters": {}}]'
    message = AnswerParser(None, parse_required).message(text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", WEATHER), ("f", {})]
    named = AnswerParser(None, parse_named("get_weather"))
    streamed = stream(named, json.dumps(WEATHER), [1, 5, 9])
    assert streamed["calls"][0]["name"] == "get_weather" and json.loads(streamed["calls"][0]["arguments"]) == WEATHER


def test_first_tool_call_delta_carries_id_and_name_then_argument_chunks():
    parser = AnswerParser(None, PARSERS["hermes"])
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    first_cut = text.index('"Par')
    deltas = parser.deltas(text[:first_cut], final=False) + parser.deltas(text, final=True)
    start = deltas[0]["tool_calls"][0]
    assert start["id"].startswith("call_") and start["type"] == "function"
    assert start["function"] == {"name": "get_weather", "arguments": ""}
    chunks = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]]
    assert len(chunks) == 2 and "".join(chunks) == '{"city": "Paris"}'
    assert all("id" not in d["tool_calls"][0] for d in deltas[1:])


REASONING_CASES = [
    # (starts inside <think>, output, reasoning, content)
    (False, "<think>\nThe user greets me.\n</think>\n\nHello!", "The user greets me.", "Hello!"),
    (False, "Hello without thinking.", None, "Hello without thinking."),
    (True, "Opened by the template.\n</think>\n\nAnswer.", "Opened by the template.", "Answer."),
    (True, "<think>Still thinking when cut off", "Still thinking when cut off", None),
    (False, "<think></think>Empty thought.", None, "Empty thought."),
]


@pytest.mark.parametrize("opened,text,reasoning,content", REASONING_CASES)
def test_reasoning_split_whole_and_streamed(opened, text, reasoning, content):
    message = AnswerParser(ReasoningParser("qwen3", opened), None).message(text)
    assert (message["reasoning_content"], message["content"]) == (reasoning, content)
    for cuts in cuttings(text):
        parser = AnswerParser(ReasoningParser("qwen3", opened), None)
        streamed = stream(parser, text, cuts)
        assert (streamed["reasoning"], streamed["content"]) == (reasoning or "", content or "")


def test_reasoning_then_tool_call():
    text = '<think>Weather needs a tool.</think>\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    parser = AnswerParser(ReasoningParser("qwen3", False), PARSERS["hermes"])
    streamed = stream(parser, text, list(range(1, len(text), 3)))
    assert streamed["reasoning"] == "Weather needs a tool." and streamed["content"] == ""
    assert streamed["calls"][0]["name"] == "get_weather" and streamed["calls"][0]["arguments"] == "{}"


def test_parsers_are_chosen_from_the_template():
    assert detect_tool_parser("{% for tool in tools %}<tool_call>{% endfor %}") == "hermes"
    assert detect_tool_parser("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]") == "mistral"
    assert detect_tool_parser("<|start_header_id|>ipython{{ tools }}<|python_tag|>") == "llama3_json"
    assert detect_tool_parser("{{ messages }}") == "hermes"   # ondo describes the tools in Hermes' format
    assert detect_reasoning_parser("<|im_start|>assistant\n<think>\n") == "qwen3"
    assert detect_reasoning_parser("<｜Assistant｜><think>\n") == "deepseek_r1"
    assert detect_reasoning_parser("{{ messages }}") is None
    template = "<|im_start|>assistant\n<think>"
    assert reasoning_parser_for("auto", template, {"enable_thinking": False}, "") is None
    assert reasoning_parser_for("none", template, None, "") is None
    assert reasoning_parser_for("auto", template, None, "<|im_start|>assistant\n<think>\n").starts_in_reasoning
    assert reasoning_parser_for("deepseek_r1", None, None, "").starts_in_reasoning
    with pytest.raises(ValueError, match="reasoning parser must be one of"):
        reasoning_parser_for("o1", template, None, "")
