"""POST /v1/chat/completions: the conversation goes through the model's chat template.

With tools, or a model that thinks aloud, each answer goes through an `AnswerParser`
(chat_output.py) that splits it into reasoning_content, content and tool_calls, whole or streamed.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from ondo.outputs import RequestOutput
from ondo.sampling_params import SamplingParams
from ondo.server.errors import bad_request
from ondo.server.chat_output import AnswerParser
from ondo.server.params import (chat_prompt_ids, check_context, check_supported, sampling_params,
                                structured_outputs)
from ondo.server.protocol import (AssistantMessage, ChatChoice, ChatCompletionRequest,
                                  ChatCompletionResponse, ChatLogprobs)
from ondo.server.reasoning import reasoning_parser_for
from ondo.server.tool_choice import plan_tools
from ondo.server.tool_parsers import detect_tool_parser
from ondo.server.serving_lora import lora_for
from ondo.server.serving import (SSE_DONE, Job, ServerState, chat_logprob_entries, collect_finals,
                                 finish_reason_of, job_outputs, new_id, off_loop, positions, sse, sse_error,
                                 start_job, until_disconnected)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest,
                                 raw_request: Request) -> ChatCompletionResponse | StreamingResponse:
    # The chat template and the tokenizer take seconds on a long conversation: never on the event loop.
    prompt_ids, params, top_logprobs, parsers = await off_loop(_prepare, state, body)
    job = await start_job(state, new_id("chatcmpl"), [(None, prompt_ids)], params, lora_for(state, body.model))
    if body.stream:
        return StreamingResponse(_stream(state, job, body, top_logprobs, parsers), media_type="text/event-stream")
    finals = await until_disconnected(raw_request, collect_finals(state, job))
    final = finals.get(job.streams[0].request_id)
    choices = []
    for completion in sorted(final.outputs, key=lambda c: c.index) if final else []:
        logprobs = None
        if top_logprobs is not None:
            items = positions(completion, 0, len(completion.token_ids))
            logprobs = ChatLogprobs(content=chat_logprob_entries(items, top_logprobs, state.tokenizer))
        parser = parsers[completion.index]
        fields = parser.message(completion.text) if parser.active else {"content": completion.text}
        choices.append(ChatChoice(index=completion.index, message=AssistantMessage(**fields), logprobs=logprobs,
                                  finish_reason=_finish_reason(completion, bool(fields.get("tool_calls"))),
                                  stop_reason=completion.stop_reason,
                                  token_ids=list(completion.token_ids) if body.return_token_ids else None))
    return ChatCompletionResponse(id=job.response_id, model=job.model, choices=choices, usage=job.usage(finals),
                                  prompt_token_ids=list(prompt_ids) if body.return_token_ids else None)


def _prepare(state: ServerState, body: ChatCompletionRequest) -> tuple[list[int], SamplingParams, int | None,
                                                                       list[AnswerParser]]:
    """The request's checks, prompt ids, SamplingParams, top_logprobs and answer parsers (in a
    worker thread)."""
    state.check_model(body.model)
    check_supported(body)
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise bad_request("give max_completion_tokens or max_tokens, not both with different values "
                          f"(got {body.max_completion_tokens} and {body.max_tokens})", "max_completion_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    max_tokens_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    tokenizer = state.tokenizer
    parser_name = getattr(state, "tool_call_parser", None)
    if parser_name in (None, "auto"):
        parser_name = detect_tool_parser(tokenizer.chat_template)
    plan = plan_tools(body, tokenizer.chat_template, parser_name)
    if plan.structured is not None and structured_outputs(body) is not None:
        raise bad_request("tool_choice required or a named function is enforced by a grammar and cannot be "
                          "combined with response_format or guided_*", "tool_choice")
    # max_tokens None = up to the end of the context, as OpenAI does for chat.
    params = sampling_params(body, max_tokens=max_tokens, max_tokens_field=max_tokens_field,
                             logprobs=top_logprobs, logprobs_field="top_logprobs",
                             vocab_size=state.engine.engine.vocab_size, structured=plan.structured,
                             defaults=state.sampling_defaults)
    prompt_ids = chat_prompt_ids(body, tokenizer, plan)
    check_context(len(prompt_ids), max_tokens, state.max_model_len, "messages", max_tokens_field)
    # A grammar shapes the answer from its first token: there is no thinking to split off then.
    reasoning = None if params.structured_outputs is not None else reasoning_parser_for(
        getattr(state, "reasoning_parser", None), tokenizer.chat_template, body.chat_template_kwargs,
        tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False))
    parsers = [AnswerParser(reasoning, plan.parser) for _ in range(params.n)]
    return prompt_ids, params, top_logprobs, parsers


def _finish_reason(completion, called_tools: bool) -> str:
    reason = finish_reason_of(completion)
    return "tool_calls" if called_tools and reason == "stop" else reason


async def _stream(state: ServerState, job: Job, body: ChatCompletionRequest,
                  top_logprobs: int | None, parsers: list[AnswerParser]) -> AsyncIterator[str]:
    created = int(time.time())
    tokenizer = state.engine.engine.tokenizer
    finished: set[int] = set()
    finals: dict[str, RequestOutput] = {}

    # With return_token_ids: each choice's ids not sent yet (a parser may hold text back for a while).
    unsent_ids: dict[int, list[int]] = {index: [] for index in range(job.params.n)}

    def chunk(index: int, delta: dict, logprobs: list | None = None, finish_reason: str | None = None,
              stop_reason: int | str | None = None, prompt_ids: list[int] | None = None) -> str:
        choice = {"index": index, "delta": delta,
                  "logprobs": {"content": [e.model_dump() for e in logprobs]} if logprobs is not None else None,
                  "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        event = {"id": job.response_id, "object": "chat.completion.chunk", "created": created,
                 "model": job.model, "choices": [choice]}
        if body.return_token_ids:
            choice["token_ids"], unsent_ids[index] = unsent_ids[index], []
            if prompt_ids is not None:
                event["prompt_token_ids"] = prompt_ids
        return sse(event)

    try:
        # The role comes first, before any token: clients show the turn at once.
        for index in range(job.params.n):
            yield chunk(index, {"role": "assistant", "content": ""},
                        prompt_ids=list(job.prompts[0][1]) if index == 0 else None)
        async for output in job_outputs(state, job):
            finals[output.request_id] = output
            for completion in output.outputs:
                if completion.index in finished:
                    continue
                if body.return_token_ids:
                    unsent_ids[completion.index] += completion.token_ids_delta
                if not (completion.text_delta or completion.finished
                        or ((top_logprobs is not None or body.return_token_ids) and completion.token_ids_delta)):
                    continue
                logprobs = None
                if top_logprobs is not None:
                    end = len(completion.token_ids)
                    items = positions(completion, end - len(completion.token_ids_delta), end)
                    logprobs = chat_logprob_entries(items, top_logprobs, tokenizer)
                parser = parsers[completion.index]
                if not parser.active:
                    deltas = [{"content": completion.text_delta}] if completion.text_delta else []
                else:
                    deltas = parser.deltas(completion.text, completion.finished)
                finish_reason = None
                if completion.finished:
                    finished.add(completion.index)
                    finish_reason = _finish_reason(completion, parser.called_tools)
                if not deltas and finish_reason is None and logprobs is None and not (
                        body.return_token_ids and unsent_ids[completion.index]):
                    continue   # the parser holds back a tag that may still be forming
                for i, delta in enumerate(deltas or [{}]):
                    last = i == max(len(deltas), 1) - 1
                    yield chunk(completion.index, delta, logprobs if i == 0 else None,
                                finish_reason if last else None, completion.stop_reason if last else None)
        for index in range(job.params.n):
            if index not in finished:  # ended without finishing: the server is shutting down
                yield chunk(index, {}, None, "abort")
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse({"id": job.response_id, "object": "chat.completion.chunk", "created": created,
                       "model": job.model, "choices": [], "usage": job.usage(finals).model_dump()})
    except Exception as exc:  # noqa: BLE001 -- the status line is sent: report in the stream
        yield sse_error(exc)
    yield SSE_DONE
