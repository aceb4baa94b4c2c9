"""An assistant answer split into reasoning, content and tool calls, whole or as stream deltas.

`AnswerParser` runs the reasoning parser, then the tool parser on what remains; both are pure
functions of the text so far (see reasoning.py and tool_parsers.py). `deltas(text)` returns what
is new since the last call in OpenAI's streaming shape -- a tool call's first delta carries its id
and name, later ones argument chunks -- and `message(text)` the final fields, computed the same
way, so a stream always reassembles to the non-streamed answer.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from ondo.server.reasoning import ReasoningParser
from ondo.server.tool_choice import ToolParser
from ondo.server.tool_parsers import CallDraft

logger = logging.getLogger("ondo")


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class _Sent:
    reasoning: str = ""
    content: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)   # (id, arguments sent so far)


class AnswerParser:
    """One choice's answer. Without parsers the text is content, untouched."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None) -> None:
        self.reasoning_parser = reasoning
        self.tool_parser = tools
        self._sent = _Sent()

    @property
    def active(self) -> bool:
        return self.reasoning_parser is not None or self.tool_parser is not None

    def parse(self, text: str, final: bool) -> tuple[str | None, str, list[CallDraft]]:
        reasoning, rest = (None, text) if self.reasoning_parser is None else self.reasoning_parser.split(text, final)
        if self.tool_parser is None:
            return reasoning, rest, []
        parsed = self.tool_parser(rest, final)
        # Around calls, whitespace alone is not an answer: it appears with the first visible character.
        content = parsed.content if parsed.content.strip() else ""
        return reasoning, content, parsed.calls

    def message(self, text: str) -> dict[str, Any]:
        """content / reasoning_content / tool_calls of the whole answer (ids as streamed, if it was)."""
        reasoning, content, calls = self.parse(text, final=True)
        ids = [call_id for call_id, _ in self._sent.calls]
        tool_calls = [{"id": ids[i] if i < len(ids) else new_tool_call_id(), "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}} for i, call in enumerate(calls)]
        return {"content": content or (None if tool_calls or reasoning else ""), "reasoning_content": reasoning,
                "tool_calls": tool_calls}

    def deltas(self, text: str, final: bool) -> list[dict[str, Any]]:
        """The deltas that bring the stream from what was sent to `text`."""
        reasoning, content, calls = self.parse(text, final)
        sent, out = self._sent, []
        new_reasoning = _extension(sent.reasoning, reasoning or "", "reasoning_content")
        if new_reasoning:
            out.append({"reasoning_content": new_reasoning})
            sent.reasoning += new_reasoning
        new_content = _extension(sent.content, content, "content")
        if new_content:
            out.append({"content": new_content})
            sent.content += new_content
        for index, call in enumerate(calls):
            if index == len(sent.calls):
                call_id = new_tool_call_id()
                sent.calls.append((call_id, ""))
                out.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            call_id, arguments = sent.calls[index]
            new_arguments = _extension(arguments, call.arguments, "tool call arguments")
            if new_arguments:
                out.append({"tool_calls": [{"index": index, "function": {"arguments": new_arguments}}]})
                sent.calls[index] = (call_id, arguments + new_arguments)
        return out

    @property
    def called_tools(self) -> bool:
        return bool(self._sent.calls)


def _extension(sent: str, now: str, what: str) -> str:
    if now.startswith(sent):
        return now[len(sent):]
    # The parsers only ever extend what they returned; should one not, the stream keeps its text.
    logger.warning("the %s parsed so far does not extend what was streamed; the rest is dropped", what)
    return ""
