"""POST /v1/responses: OpenAI's Responses API over the chat template, whole or streamed with its
typed events (response.created ... response.completed).

Stored responses (store=true, the default) are kept in memory, the most recently used first, so
that `previous_response_id` can continue a conversation; the oldest are forgotten past
MAX_STORED_RESPONSES, and asking for one then is a 404 that says so.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ondo.outputs import CompletionOutput, RequestOutput
from ondo.server.dialects import (Generation, conversation_prompt_ids, dialect_sampling_params, final_output,
                                  output_deltas, reject_unsupported, start_generation)
from ondo.server.errors import APIError, bad_request
from ondo.server.protocol import encodable
from ondo.server.protocol_responses import (RESPONSES_NEUTRAL, RESPONSES_UNSUPPORTED, IncompleteDetails,
                                            InputTokensDetails, OutputMessage, OutputText, ResponseObject,
                                            ResponsesRequest, ResponseUsage)
from ondo.server.serving import ServerState, new_id, off_loop

MAX_STORED_RESPONSES = 1024

_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text")


@dataclass
class StoredResponse:
    response: ResponseObject
    conversation: list[dict[str, str]]     # the messages so far, this response's answer included


class ResponseStore:
    """Responses by id, least recently used forgotten first."""

    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, item: StoredResponse) -> None:
        self._items[item.response.id] = item
        self._items.move_to_end(item.response.id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str, field: str | None = None) -> StoredResponse:
        item = self._items.get(response_id)
        if item is None:
            raise APIError(404, f"no stored response has the id '{response_id}': it was stored with store=false, "
                                f"never existed, or was forgotten (the server keeps the {self.capacity} most "
                                f"recently used responses in memory, and none across restarts)", param=field)
        self._items.move_to_end(response_id)
        return item

    def __len__(self) -> int:
        return len(self._items)


def response_store(state: ServerState) -> ResponseStore:
    store = getattr(state, "response_store", None)
    if store is None:
        store = state.response_store = ResponseStore()
    return store


def input_messages(value: str | list[dict[str, Any]]) -> list[dict[str, str]]:
    """The request's `input` as chat messages; anything but text messages is a 400 naming it."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not value:
        raise bad_request("input must not be an empty list", "input")
    messages = []
    for i, item in enumerate(value):
        kind = item.get("type", "message")
        if kind != "message":
            raise bad_request(f"input[{i}] has type {kind!r}: only message items are supported (no tool calls, "
                              f"reasoning or item references)", "input")
        role = item.get("role")
        if role not in _ROLES:
            raise bad_request(f"input[{i}].role must be one of {list(_ROLES)}, got {role!r}", "input")
        unknown = sorted(set(item) - {"type", "role", "content", "id", "status"})
        if unknown:
            raise bad_request(f"input[{i}] has the field {unknown[0]!r}, which ondo does not accept", "input")
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content_text(item.get("content"), f"input[{i}].content")})
    return messages


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return _encodable(content, where)
    if not isinstance(content, list):
        raise bad_request(f"{where} must be text or a list of text parts, got {type(content).__name__}", "input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}[{j}] must be {{\"type\": \"input_text\" or \"output_text\", \"text\": "
                              f"<string>}}: only text is supported, got type {kind!r}", "input")
        texts.append(_encodable(part["text"], f"{where}[{j}].text"))
    return "".join(texts)


def _encodable(text: str, where: str) -> str:
    try:
        return encodable(text)
    except ValueError as exc:
        raise bad_request(f"{where}: {exc}", "input") from None


async def create_response(state: ServerState, body: ResponsesRequest,
                          raw_request: Request) -> ResponseObject | StreamingResponse:
    state.check_model(body.model)
    reject_unsupported(body, RESPONSES_NEUTRAL, RESPONSES_UNSUPPORTED)
    store = response_store(state)
    history = []
    if body.previous_response_id is not None:
        history = store.get(body.previous_response_id, "previous_response_id").conversation
    turn = input_messages(body.input)
    system = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    prompt_ids = await off_loop(conversation_prompt_ids, state, system + history + turn, "input")
    params = dialect_sampling_params(
        {"temperature": ("temperature", body.temperature), "top_p": ("top_p", body.top_p),
         "top_k": ("top_k", body.top_k), "min_p": ("min_p", body.min_p),
         "repetition_penalty": ("repetition_penalty", body.repetition_penalty),
         "seed": ("seed", body.seed), "stop": ("stop", body.stop)},
        body.max_output_tokens, "max_output_tokens", state.engine.engine.vocab_size)
    response_id = new_id("resp")
    generation = await start_generation(state, response_id, prompt_ids, params, "input", "max_output_tokens",
                                        body.model)
    skeleton = ResponseObject(
        id=response_id, status="in_progress", model=state.model_name, instructions=body.instructions,
        max_output_tokens=body.max_output_tokens, previous_response_id=body.previous_response_id,
        store=body.store, temperature=params.temperature, top_p=params.top_p, user=body.user,
        metadata=body.metadata or {})
    message_id = new_id("msg")

    def finish(completion: CompletionOutput, final: RequestOutput) -> ResponseObject:
        incomplete = completion.finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        message = OutputMessage(id=message_id, status=status, content=[OutputText(text=completion.text)])
        response = skeleton.model_copy(update={
            "status": status, "output": [message],
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            "usage": _usage(generation, completion, final)})
        if body.store:
            conversation = history + turn + [{"role": "assistant", "content": completion.text}]
            store.put(StoredResponse(response, conversation))
        return response

    if body.stream:
        return StreamingResponse(_events(state, generation, skeleton, message_id, finish),
                                 media_type="text/event-stream")
    completion, final = await final_output(state, generation, raw_request)
    return finish(completion, final)


def _usage(generation: Generation, completion: CompletionOutput, final: RequestOutput) -> ResponseUsage:
    input_tokens, output_tokens = len(generation.prompt_ids), len(completion.token_ids)
    return ResponseUsage(input_tokens=input_tokens, output_tokens=output_tokens,
                         input_tokens_details=InputTokensDetails(cached_tokens=final.num_cached_tokens),
                         total_tokens=input_tokens + output_tokens)


async def _events(state: ServerState, generation: Generation, skeleton: ResponseObject, message_id: str,
                  finish) -> AsyncIterator[str]:
    sequence = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        data = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=skeleton.model_dump())
    yield event("response.in_progress", response=skeleton.model_dump())
    yield event("response.output_item.added", output_index=0,
                item=OutputMessage(id=message_id, status="in_progress").model_dump())
    yield event("response.content_part.added", **where, part=OutputText(text="").model_dump())
    try:
        async for completion, final in output_deltas(state, generation):
            if completion.text_delta:
                yield event("response.output_text.delta", **where, delta=completion.text_delta, logprobs=[])
            if not completion.finished:
                continue
            if completion.finish_reason == "abort":
                raise APIError(503, "the request was aborted: the server is shutting down")
            response = finish(completion, final)
            message = response.output[0]
            yield event("response.output_text.done", **where, text=completion.text, logprobs=[])
            yield event("response.content_part.done", **where, part=message.content[0].model_dump())
            yield event("response.output_item.done", output_index=0, item=message.model_dump())
            kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
            yield event(kind, response=response.model_dump())
            return
        raise APIError(503, "the request was aborted: the server is shutting down")
    except Exception as exc:  # noqa: BLE001 -- the status line is sent: report in the stream
        failure = exc if isinstance(exc, APIError) else APIError(500, f"generation failed: {exc}")
        error = failure.body()["error"]
        yield event("error", code=str(error["code"]), message=error["message"], param=error["param"])
        failed = skeleton.model_copy(update={"status": "failed", "error": {"code": "server_error",
                                                                           "message": error["message"]}})
        yield event("response.failed", response=failed.model_dump())


def get_response(state: ServerState, response_id: str) -> ResponseObject:
    state.check_ready()
    return response_store(state).get(response_id, "response_id").response
