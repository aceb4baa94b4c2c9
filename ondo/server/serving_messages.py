"""POST /v1/messages: Anthropic's Messages API over the chat template, whole or streamed with
Anthropic's events (message_start, content_block_start/delta/stop, message_delta, message_stop).

A conversation that ends with an assistant turn is continued from that text (Anthropic's
"prefill"); stop_reason is end_turn (the model ended its turn), max_tokens or stop_sequence.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ondo.outputs import CompletionOutput, RequestOutput
from ondo.server.dialects import (Generation, conversation_prompt_ids, dialect_sampling_params, final_output,
                                  output_deltas, reject_unsupported, start_generation)
from ondo.server.errors import APIError, bad_request
from ondo.server.protocol import encodable
from ondo.server.protocol_anthropic import (MESSAGES_NEUTRAL, MESSAGES_UNSUPPORTED, MessagesRequest,
                                            MessagesResponse, MessagesUsage, TextBlock, anthropic_error_body)
from ondo.server.serving import ServerState, new_id, off_loop

# Keys a text block may carry besides its text: hints that change nothing in the output here
# (ondo caches prompt prefixes on its own).
_TEXT_BLOCK_KEYS = {"type", "text", "cache_control", "citations"}


def block_text(content: str | list[dict[str, Any]], where: str, field: str) -> str:
    """The text of a string or of a list of text blocks; any other block is a 400 naming it."""
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise bad_request(f"{where}[{j}] has type {kind!r}: only text blocks ({{\"type\": \"text\", \"text\": "
                              f"<string>}}) are supported (no images, documents, tool use or tool results)", field)
        unknown = sorted(set(block) - _TEXT_BLOCK_KEYS)
        if unknown:
            raise bad_request(f"{where}[{j}] has the field {unknown[0]!r}, which ondo does not accept", field)
        try:
            texts.append(encodable(block["text"]))
        except ValueError as exc:
            raise bad_request(f"{where}[{j}].text: {exc}", field) from None
    return "".join(texts)


def conversation(body: MessagesRequest) -> list[dict[str, str]]:
    if not body.messages:
        raise bad_request("messages must hold at least one message", "messages")
    messages = []
    if body.system is not None:
        messages.append({"role": "system", "content": block_text(body.system, "system", "system")})
    for i, message in enumerate(body.messages):
        messages.append({"role": message.role,
                         "content": block_text(message.content, f"messages[{i}].content", "messages")})
    return messages


def stop_reason_of(completion: CompletionOutput) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for a finished candidate."""
    if completion.finish_reason == "length":
        return "max_tokens", None
    if isinstance(completion.stop_reason, str):
        return "stop_sequence", completion.stop_reason
    return "end_turn", None


async def create_message(state: ServerState, body: MessagesRequest,
                         raw_request: Request) -> MessagesResponse | StreamingResponse:
    state.check_model(body.model)
    reject_unsupported(body, MESSAGES_NEUTRAL, MESSAGES_UNSUPPORTED)
    messages = conversation(body)
    prefill = body.messages[-1].role == "assistant"
    prompt_ids = await off_loop(conversation_prompt_ids, state, messages, "messages", prefill)
    params = dialect_sampling_params(
        {"temperature": ("temperature", body.temperature), "top_p": ("top_p", body.top_p),
         "top_k": ("top_k", body.top_k), "stop": ("stop_sequences", body.stop_sequences)},
        body.max_tokens, "max_tokens", state.engine.engine.vocab_size)
    generation = await start_generation(state, new_id("msg"), prompt_ids, params, "messages", "max_tokens", body.model)
    if body.stream:
        return StreamingResponse(_events(state, generation), media_type="text/event-stream")
    completion, final = await final_output(state, generation, raw_request)
    stop_reason, stop_sequence = stop_reason_of(completion)
    return MessagesResponse(id=generation.job.response_id, model=state.model_name,
                            content=[TextBlock(text=completion.text)], stop_reason=stop_reason,
                            stop_sequence=stop_sequence, usage=_usage(generation, completion, final))


def _usage(generation: Generation, completion: CompletionOutput | None, final: RequestOutput | None) -> MessagesUsage:
    return MessagesUsage(input_tokens=len(generation.prompt_ids),
                         output_tokens=len(completion.token_ids) if completion is not None else 0,
                         cache_read_input_tokens=final.num_cached_tokens if final is not None else 0)


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(state: ServerState, generation: Generation) -> AsyncIterator[str]:
    usage = _usage(generation, None, None).model_dump()
    yield _event("message_start", {"message": {
        "id": generation.job.response_id, "type": "message", "role": "assistant", "model": state.model_name,
        "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})
    yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    yield _event("ping", {})
    try:
        async for completion, final in output_deltas(state, generation):
            if completion.text_delta:
                yield _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                                           "text": completion.text_delta}})
            if not completion.finished:
                continue
            if completion.finish_reason == "abort":
                break
            stop_reason, stop_sequence = stop_reason_of(completion)
            yield _event("content_block_stop", {"index": 0})
            yield _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                           "usage": {"output_tokens": len(completion.token_ids)}})
            yield _event("message_stop", {})
            return
        raise APIError(503, "the request was aborted: the server is shutting down")
    except Exception as exc:  # noqa: BLE001 -- the status line is sent: report in the stream
        body = anthropic_error_body(exc.status, exc.message) if isinstance(exc, APIError) else \
            anthropic_error_body(500, f"generation failed: {exc}")
        yield f"event: error\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"
