"""OpenAI's Responses API (POST /v1/responses): the request and the response object.

Input is a string or a list of message items; the items are checked in serving_responses.py so
that an unsupported one (an image, a function call) gets a 400 naming it. Fields ondo does not
implement (tools, reasoning, structured text formats, ...) are declared so setting one is a 400
too, unless set to their neutral value.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from ondo.server.protocol import Int, Text, _ranged, _Request


class ResponsesRequest(_Request):
    model: str | None = Field(None, description="Must name the served model when given.")
    input: Text | list[dict[str, Any]] = Field(
        description="Text (one user message), or a list of messages: {\"role\": \"user\" | \"assistant\" | "
                    "\"system\" | \"developer\", \"content\": text or [{\"type\": \"input_text\" | "
                    "\"output_text\", \"text\": ...}]}.")
    instructions: Text | None = Field(None, description="A system message put first (not carried over by "
                                                         "previous_response_id, as in OpenAI's API).")
    previous_response_id: str | None = Field(
        None, description="Continue the conversation of a stored response (kept in memory, most recent first).")
    max_output_tokens: Int | None = _ranged("Most tokens to generate; none = up to the end of the context.", ge=1)
    temperature: float | None = _ranged("0 = greedy.", ge=0)
    top_p: float | None = _ranged("Nucleus sampling mass.", gt=0, le=1)
    stream: bool = False
    store: bool = Field(True, description="Keep the response in memory for previous_response_id and GET.")
    metadata: dict[str, str] | None = Field(None, description="Returned with the response.")
    user: str | None = Field(None, description="Accepted for compatibility; not used.")
    # ondo's extras (vLLM's names), as on the other endpoints.
    top_k: Int | None = _ranged("Keep the k most likely tokens; -1 = off.", ge=-1, not_value=0)
    min_p: float | None = _ranged("Drop tokens less likely than min_p x the most likely one.", ge=0, le=1)
    repetition_penalty: float | None = _ranged("> 1 discourages tokens already in the prompt or output.", gt=0)
    seed: Int | None = _ranged("Same seed, same tokens.", ge=-(2**63), le=2**64 - 1)
    stop: Text | list[Text] | None = Field(None, description="Strings that end the generation (not returned).")
    # Responses fields ondo does not implement: a 400 unless neutral.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    max_tool_calls: Any = None
    text: Any = None
    reasoning: Any = None
    include: Any = None
    top_logprobs: Any = None
    truncation: Any = None
    background: Any = None
    service_tier: Any = None
    stream_options: Any = None
    prompt: Any = None
    conversation: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None


RESPONSES_NEUTRAL: dict[str, tuple] = {
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True, False),
    "text": ({"format": {"type": "text"}}, {}),
    "include": ([],),
    "top_logprobs": (0,),
    "truncation": ("disabled",),
    "background": (False,),
    "service_tier": ("auto", "default"),
    "stream_options": ({}, {"include_obfuscation": False}, {"include_obfuscation": True}),
}
RESPONSES_UNSUPPORTED = ("tools", "tool_choice", "parallel_tool_calls", "max_tool_calls", "text", "reasoning",
                         "include", "top_logprobs", "truncation", "background", "service_tier",
                         "stream_options", "prompt", "conversation")


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = []


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage] = []
    parallel_tool_calls: bool = False
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = {"effort": None, "summary": None}
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = {"format": {"type": "text"}}
    tool_choice: str = "none"
    tools: list[Any] = []
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = {}

    @property
    def output_text(self) -> str:
        return "".join(part.text for item in self.output for part in item.content)
