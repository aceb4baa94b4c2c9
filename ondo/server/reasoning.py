"""Reasoning output: the `<think>...</think>` part of an answer returned as `reasoning_content`.

Parsers (`--reasoning-parser`): `qwen3` (the model writes `<think>` itself, or the template has
opened it at the end of the prompt) and `deepseek_r1` (everything before `</think>` is reasoning,
with or without an opening tag). By default the parser is chosen from the chat template: one
that mentions `<think>` gets `qwen3` (`deepseek_r1` for DeepSeek's). A request with
`chat_template_kwargs={"enable_thinking": false}` is not split at all.

`split(text, final)` is a pure function of the text so far; while the text is incomplete it
holds back a tag that may still be forming and trailing whitespace of the reasoning, so each
result extends the previous one and the streamed deltas add up to the final message.
"""
from __future__ import annotations

from typing import Any

REASONING_PARSERS = ("qwen3", "deepseek_r1")
OPEN_TAG, CLOSE_TAG = "<think>", "</think>"


class ReasoningParser:
    def __init__(self, name: str, starts_in_reasoning: bool) -> None:
        self.name = name
        # The prompt ends inside an open <think> (DeepSeek-R1 always; Qwen3 templates that open it).
        self.starts_in_reasoning = starts_in_reasoning

    def split(self, text: str, final: bool) -> tuple[str | None, str]:
        """(reasoning or None, content) of the output text so far."""
        stripped = text.lstrip()
        if stripped.startswith(OPEN_TAG):
            body = stripped[len(OPEN_TAG):]
        elif not final and OPEN_TAG.startswith(stripped):
            return None, ""        # nothing yet, or an opening tag still forming
        elif self.starts_in_reasoning:
            body = text
        else:
            return None, text      # the model did not think: all of it is the answer
        close = body.find(CLOSE_TAG)
        if close == -1:   # still thinking (or cut off while thinking)
            reasoning = body if final else body[:_possible_start(body, CLOSE_TAG)]
            return reasoning.strip() or None, ""
        reasoning = body[:close].strip() or None
        return reasoning, body[close + len(CLOSE_TAG):].lstrip()


def _possible_start(text: str, tag: str) -> int:
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return len(text) - size
    return len(text)


def detect_reasoning_parser(chat_template: str | None) -> str | None:
    template = chat_template or ""
    if OPEN_TAG not in template:
        return None
    return "deepseek_r1" if "<｜Assistant｜>" in template else "qwen3"


def reasoning_parser_for(name: str | None, chat_template: str | None, template_kwargs: dict[str, Any] | None,
                         prompt_tail: str) -> ReasoningParser | None:
    """The parser for one chat request. `name`: the server's --reasoning-parser ("auto" or None =
    from the template, "none" = off); `prompt_tail`: the end of the rendered prompt."""
    if (template_kwargs or {}).get("enable_thinking") is False:
        return None
    if name in (None, "auto"):
        name = detect_reasoning_parser(chat_template)
    if name in (None, "none"):
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"reasoning parser must be one of auto, none, {', '.join(REASONING_PARSERS)}; got {name!r}")
    opened = prompt_tail.rstrip().endswith(OPEN_TAG)
    return ReasoningParser(name, starts_in_reasoning=opened or name == "deepseek_r1")
