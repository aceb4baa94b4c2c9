"""POST /v1/completions: OpenAI's legacy completion API, whole or streamed as SSE."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ondo.outputs import CompletionOutput, RequestOutput
from ondo.server.errors import bad_request
from ondo.server.params import check_context, check_supported, completion_prompts, sampling_params
from ondo.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from ondo.server.serving import (SSE_DONE, Job, ServerState, collect_finals, finish_reason_of, finite,
                                 job_outputs, new_id, positions, sse, sse_error, start_job, token_text,
                                 top_entries, until_disconnected)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


async def create_completion(state: ServerState, body: CompletionRequest,
                            raw_request: Request) -> CompletionResponse | StreamingResponse:
    state.check_model(body.model)
    check_supported(body)
    if body.echo and body.logprobs is not None:
        raise bad_request("echo=true together with logprobs is not supported", "echo")
    tokenizer = state.engine.engine.tokenizer
    prompts = completion_prompts(body, tokenizer, state.engine.engine.vocab_size)
    params = sampling_params(body, max_tokens=body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS,
                             max_tokens_field="max_tokens", logprobs=body.logprobs, logprobs_field="logprobs",
                             num_prompts=len(prompts),
                             vocab_size=state.engine.engine.vocab_size)
    for _, ids in prompts:
        # The default of 16 is cut to the room left; only a max_tokens the client chose is an error.
        check_context(len(ids), body.max_tokens, state.max_model_len, "prompt", "max_tokens")
    if body.echo:
        prompts = [(text if text is not None else tokenizer.decode(ids) if tokenizer else "", ids)
                   for text, ids in prompts]
    job = await start_job(state, new_id("cmpl"), prompts, params)
    if body.stream:
        return StreamingResponse(_stream(state, job, body), media_type="text/event-stream")
    finals = await until_disconnected(raw_request, collect_finals(state, job))
    choices = []
    for request_id, prompt_index in job.prompt_index.items():
        final = finals.get(request_id)
        for completion in _sorted_outputs(final):
            echo = prompts[prompt_index][0] if body.echo else ""
            choices.append(CompletionChoice(
                index=prompt_index * params.n + completion.index, text=echo + completion.text,
                logprobs=_logprobs(completion, 0, len(completion.token_ids), 0, body.logprobs, tokenizer),
                finish_reason=finish_reason_of(completion), stop_reason=completion.stop_reason))
    return CompletionResponse(id=job.response_id, model=job.model, choices=choices, usage=job.usage(finals))


def _sorted_outputs(final: RequestOutput | None) -> list[CompletionOutput]:
    return sorted(final.outputs, key=lambda c: c.index) if final is not None else []


def _logprobs(completion: CompletionOutput, start: int, end: int, text_offset: int, k: int | None,
              tokenizer: Any) -> CompletionLogprobs | None:
    if k is None:
        return None
    result = CompletionLogprobs()
    for token_id, position in positions(completion, start, end):
        chosen = position[token_id]
        text = token_text(token_id, chosen, tokenizer)
        result.tokens.append(text)
        result.token_logprobs.append(finite(chosen.logprob))
        top = {token_text(tid, lp, tokenizer): finite(lp.logprob) for tid, lp in top_entries(position, k)}
        top.setdefault(text, finite(chosen.logprob))
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result


async def _stream(state: ServerState, job: Job, body: CompletionRequest) -> AsyncIterator[str]:
    created = int(time.time())
    tokenizer = state.engine.engine.tokenizer
    n = job.params.n
    text_offsets: dict[int, int] = {}        # choice index -> characters sent so far
    finished: set[int] = set()
    finals: dict[str, RequestOutput] = {}

    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, completion: CompletionOutput | None,
              finish_reason: str | None) -> str:
        choice = {"index": index, "text": text,
                  "logprobs": logprobs.model_dump() if logprobs is not None else None,
                  "finish_reason": finish_reason}
        if finish_reason is not None and completion is not None:
            choice["stop_reason"] = completion.stop_reason
        return sse({"id": job.response_id, "object": "text_completion", "created": created,
                    "model": job.model, "choices": [choice]})

    try:
        async for output in job_outputs(state, job):
            finals[output.request_id] = output
            prompt_index = job.prompt_index[output.request_id]
            for completion in output.outputs:
                index = prompt_index * n + completion.index
                if index in finished:
                    continue
                if not (completion.text_delta or completion.finished
                        or (body.logprobs is not None and completion.token_ids_delta)):
                    continue
                text = completion.text_delta
                if index not in text_offsets:
                    text_offsets[index] = 0
                    if body.echo:
                        text = job.prompts[prompt_index][0] + text
                end = len(completion.token_ids)
                logprobs = _logprobs(completion, end - len(completion.token_ids_delta), end,
                                     text_offsets[index], body.logprobs, tokenizer)
                text_offsets[index] += len(text)
                if completion.finished:
                    finished.add(index)
                yield chunk(index, text, logprobs, completion, completion.finish_reason)
        # Requests ended without finishing (the server is shutting down): say so.
        for index in range(len(job.prompts) * n):
            if index not in finished:
                yield chunk(index, "", None, None, "abort")
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse({"id": job.response_id, "object": "text_completion", "created": created,
                       "model": job.model, "choices": [], "usage": job.usage(finals).model_dump()})
    except Exception as exc:  # noqa: BLE001 -- the status line is sent: report in the stream
        yield sse_error(exc)
    yield SSE_DONE
