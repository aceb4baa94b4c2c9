"""Tool calls in a model's own output format, turned into OpenAI's `tool_calls`.

Formats: `hermes` (Qwen 2.5 / 3, Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`),
`llama3_json` (Llama 3.x: the answer is `{"name": ..., "parameters": {...}}`, several joined by
`;`, optionally after `<|python_tag|>`), `mistral` (`[TOOL_CALLS][{"name": ..., "arguments": ...}]`).
Two more read what ondo's own grammars force for `tool_choice`: `required` (a JSON array of
`{"name", "parameters"}` objects) and a named function (the output is the arguments).

Every parser is a pure function `parse(text, final) -> ParsedTools` of the text so far. While the
text is incomplete (`final=False`) it returns only what can no longer change: content stops before
a possible start tag, a call appears once its name and the start of its arguments are known, and
its arguments grow as raw JSON text. Streaming sends the differences between successive results,
so the streamed pieces always add up to the non-streamed answer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

PARSER_NAMES = ("hermes", "llama3_json", "mistral")
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class CallDraft:
    name: str
    arguments: str          # raw JSON text of the arguments, complete once `complete`
    complete: bool = False


@dataclass
class ParsedTools:
    content: str
    calls: list[CallDraft] = field(default_factory=list)


# ---- a tolerant scanner over JSON text that may end anywhere -------------------------------------

_WHITESPACE = " \t\r\n"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _string_end(text: str, pos: int) -> int | None:
    """Index after the JSON string starting at text[pos] == '"', or None if it does not end."""
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 2
            continue
        if char == '"':
            return pos + 1
        pos += 1
    return None


def value_end(text: str, pos: int) -> int | None:
    """Index after the JSON value starting at text[pos], or None if the text ends inside it.
    Only brackets and strings are tracked: the model's JSON is checked by whoever reads it."""
    if pos >= len(text):
        return None
    if text[pos] == '"':
        return _string_end(text, pos)
    if text[pos] in "{[":
        depth = 0
        while pos < len(text):
            char = text[pos]
            if char == '"':
                end = _string_end(text, pos)
                if end is None:
                    return None
                pos = end
                continue
            if char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    return pos + 1
            pos += 1
        return None
    start = pos   # a number, true, false or null: ends at a delimiter
    while pos < len(text) and text[pos] not in ",}] \t\r\n;":
        pos += 1
    return pos if pos < len(text) and pos > start else None


@dataclass
class _ObjectScan:
    fields: dict[str, tuple[str, bool]]   # key -> (raw value text so far, complete)
    end: int | None                       # index after the closing brace; None while open


def scan_object(text: str, pos: int) -> _ObjectScan | None:
    """The top-level fields of the JSON object starting at text[pos] == '{' (None otherwise),
    as far as the text goes."""
    if pos >= len(text) or text[pos] != "{":
        return None
    fields: dict[str, tuple[str, bool]] = {}
    pos = _skip_ws(text, pos + 1)
    while pos < len(text):
        if text[pos] == "}":
            return _ObjectScan(fields, pos + 1)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if text[pos] != '"':
            return _ObjectScan(fields, None)   # not JSON we understand: stays open
        key_end = _string_end(text, pos)
        if key_end is None:
            break
        key = json.loads(text[pos:key_end])
        pos = _skip_ws(text, key_end)
        if pos >= len(text) or text[pos] != ":":
            break
        pos = _skip_ws(text, pos + 1)
        end = value_end(text, pos)
        if end is None:
            if pos < len(text):
                fields[key] = (text[pos:], False)
            break
        fields[key] = (text[pos:end], True)
        pos = _skip_ws(text, end)
    return _ObjectScan(fields, None)


def call_from_object(text: str, pos: int, name: str | None = None) -> tuple[CallDraft | None, int | None]:
    """The call in the object at text[pos] ({"name": ..., "arguments" | "parameters": ...}) and the
    index after it. The call is None until its name and the start of its arguments are known."""
    scan = scan_object(text, pos)
    if scan is None:
        return None, None
    if name is None:
        raw_name = scan.fields.get("name")
        if raw_name is None or not raw_name[1]:
            return None, scan.end
        try:
            name = json.loads(raw_name[0])
        except json.JSONDecodeError:
            return None, scan.end
        if not isinstance(name, str):
            return None, scan.end
    arguments = next((scan.fields[k] for k in _ARGUMENT_KEYS if k in scan.fields), None)
    if arguments is None:
        # A complete object without arguments is a call without any (OpenAI sends "{}").
        return (CallDraft(name, "{}", True), scan.end) if scan.end is not None else (None, None)
    raw, complete = arguments
    return CallDraft(name, raw, complete and scan.end is not None), scan.end


def calls_in_sequence(text: str, pos: int, separators: str) -> list[CallDraft]:
    """The calls in the objects one after another (separated by whitespace and `separators`) from
    text[pos] on; stops at anything else."""
    calls = []
    while True:
        pos = _skip_ws(text, pos)
        while pos < len(text) and text[pos] in separators:
            pos = _skip_ws(text, pos + 1)
        call, end = call_from_object(text, pos)
        if call is not None:
            calls.append(call)
        if call is None or end is None:
            return calls
        pos = end


def _possible_start(text: str, tag: str) -> int:
    """Index where a (partial) `tag` may begin at the end of `text`; len(text) if none."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return len(text) - size
    return len(text)


# ---- the formats ----------------------------------------------------------------------------------


def parse_hermes(text: str, final: bool) -> ParsedTools:
    start_tag, end_tag = "<tool_call>", "</tool_call>"
    content, calls, pos = [], [], 0
    while True:
        start = text.find(start_tag, pos)
        segment = text[pos:] if start == -1 else text[pos:start]
        if start == -1 and not final:
            segment = segment[:_possible_start(segment, start_tag)]
        if not calls or segment.strip():   # the line breaks between calls are not content
            content.append(segment)
        if start == -1:
            break
        body = _skip_ws(text, start + len(start_tag))
        call, _ = call_from_object(text, body)
        if call is not None:
            calls.append(call)
        close = text.find(end_tag, body)
        if close == -1:
            break
        if call is not None:
            call.complete = True
        pos = close + len(end_tag)
    return ParsedTools("".join(content), calls)


def parse_llama3_json(text: str, final: bool) -> ParsedTools:
    tag = "<|python_tag|>"
    stripped = text.lstrip()
    pos = len(text) - len(stripped)
    tagged = stripped.startswith(tag)
    if tagged:
        pos += len(tag)
    elif not final and tag.startswith(stripped):
        return ParsedTools("")   # may still become a call
    if not tagged and not stripped.startswith("{"):
        return ParsedTools(text)
    calls = calls_in_sequence(text, pos, ";")
    if final and not calls:
        return ParsedTools(text)   # JSON that is not a call (an answer in JSON) is content
    return ParsedTools("", calls)


def parse_mistral(text: str, final: bool) -> ParsedTools:
    tag = "[TOOL_CALLS]"
    start = text.find(tag)
    if start == -1:
        # skip_special_tokens may have removed the tag: a leading array of named objects is calls.
        stripped = text.lstrip()
        rest = stripped[1:].lstrip()
        if stripped.startswith("[") and (rest.startswith('{"name"') or (not final and '{"name"'.startswith(rest))):
            return _array_calls(text, len(text) - len(stripped), final)
        return ParsedTools(text if final else text[:_possible_start(text, tag)])
    parsed = _array_calls(text, _skip_ws(text, start + len(tag)), final)
    parsed.content = text[:start] + parsed.content
    return parsed


def parse_required(text: str, final: bool) -> ParsedTools:
    """tool_choice="required": the grammar forces `[{"name": ..., "parameters": {...}}, ...]`."""
    return _array_calls(text, _skip_ws(text, 0), final)


def parse_named(name: str):
    """tool_choice naming a function: the grammar forces the output to be its arguments."""
    def parse(text: str, final: bool) -> ParsedTools:
        return ParsedTools("", [CallDraft(name, text, final)])
    return parse


def _array_calls(text: str, pos: int, final: bool) -> ParsedTools:
    if pos >= len(text):
        return ParsedTools("")
    if text[pos] != "[":
        return ParsedTools(text[pos:] if final else "")
    end = value_end(text, pos)
    calls = calls_in_sequence(text[:end - 1] if end else text, pos + 1, ",")
    return ParsedTools("", calls)


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json, "mistral": parse_mistral}


def detect_tool_parser(chat_template: str | None) -> str:
    """The format a chat template teaches its model. A template that does not render tools at all
    gets them described by ondo in the Hermes format (see tool_choice.py), so Hermes is the default."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "tools" in template):
        return "llama3_json"
    return "hermes"
