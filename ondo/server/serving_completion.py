"""POST /v1/completions: OpenAI's legacy completion API, whole or streamed as SSE.

Scoring, as evaluation harnesses use it: `echo: true` returns the prompt's text and, with
`logprobs: k`, the log-prob of every prompt token (null for the first, which nothing predicts)
and its top k; `max_tokens: 0` computes the prompt and generates nothing. vLLM's `prompt_logprobs: k`
returns the same scores in each choice's `prompt_logprobs` instead.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ondo.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ondo.sampling_params import SamplingParams
from ondo.server.errors import bad_request
from ondo.server.params import (MAX_LOGPROBS, check_context, check_supported, completion_prompts,
                                sampling_params)
from ondo.server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                  PromptLogprob)
from ondo.server.serving_lora import lora_for
from ondo.server.serving import (SSE_DONE, Job, ServerState, collect_finals, finish_reason_of, finite,
                                 job_outputs, new_id, off_loop, positions, sse, sse_error, start_job,
                                 token_text, top_entries, until_disconnected)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint

# (token id, its position's log-probs; None for a prompt's first token)
Scored = list[tuple[int, PositionLogprobs | None]]


async def create_completion(state: ServerState, body: CompletionRequest,
                            raw_request: Request) -> CompletionResponse | StreamingResponse:
    # Tokenizing a long prompt takes seconds: never on the event loop, which serves everyone.
    prompts, params = await off_loop(_prepare, state, body)
    tokenizer = state.engine.engine.tokenizer
    job = await start_job(state, new_id("cmpl"), prompts, params, lora_for(state, body.model))
    if body.stream:
        return StreamingResponse(_stream(state, job, body), media_type="text/event-stream")
    finals = await until_disconnected(raw_request, collect_finals(state, job))
    choices = []
    for request_id, prompt_index in job.prompt_index.items():
        final = finals.get(request_id)
        for completion in _sorted_outputs(final):
            echo = prompts[prompt_index][0] if body.echo else ""
            scored = _prompt_scored(final) if body.echo else []
            scored += positions(completion, 0, len(completion.token_ids))
            choices.append(CompletionChoice(
                index=prompt_index * params.n + completion.index, text=echo + completion.text,
                logprobs=_logprobs(scored, 0, body.logprobs, tokenizer),
                finish_reason=finish_reason_of(completion), stop_reason=completion.stop_reason,
                prompt_logprobs=_vllm_prompt_logprobs(final, tokenizer) if body.prompt_logprobs is not None else None,
                prompt_token_ids=list(prompts[prompt_index][1]) if body.return_token_ids else None,
                token_ids=list(completion.token_ids) if body.return_token_ids else None))
    return CompletionResponse(id=job.response_id, model=job.model, choices=choices, usage=job.usage(finals))


def _prepare(state: ServerState, body: CompletionRequest) -> tuple[list[tuple[str | None, list[int]]], SamplingParams]:
    """The request's checks, prompts (text, token ids) and SamplingParams (in a worker thread)."""
    state.check_model(body.model)
    check_supported(body)
    tokenizer = state.engine.engine.tokenizer
    prompts = completion_prompts(body, tokenizer, state.engine.engine.vocab_size)
    params = _params(body, len(prompts), state.engine.engine.vocab_size, state.sampling_defaults)
    for _, ids in prompts:
        # The default of 16 is cut to the room left; only a max_tokens the client chose is an error.
        check_context(len(ids), body.max_tokens, state.max_model_len, "prompt", "max_tokens")
    if body.echo:
        prompts = [(text if text is not None else tokenizer.decode(ids) if tokenizer else "", ids)
                   for text, ids in prompts]
    return prompts, params


def _params(body: CompletionRequest, num_prompts: int, vocab_size: int,
            defaults: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams of the request; prompt log-probs are asked for when echo shows them, when
    prompt_logprobs is set, or to score the prompt alone (max_tokens=0)."""
    if body.prompt_logprobs is not None and not 0 <= body.prompt_logprobs <= MAX_LOGPROBS:
        raise bad_request(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {body.prompt_logprobs}",
                          "prompt_logprobs")
    if body.max_tokens is not None and body.max_tokens < 0:
        raise bad_request(f"max_tokens must be >= 0 (0 = only score the prompt), got {body.max_tokens}",
                          "max_tokens")
    score_only = body.max_tokens == 0
    if score_only and body.min_tokens:
        raise bad_request(f"min_tokens ({body.min_tokens}) must be <= max_tokens (0)", "min_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    # 0 is valid only together with prompt_logprobs, which the shared builder does not set: 1 here,
    # then both at once below.
    params = sampling_params(body, max_tokens=max(max_tokens, 1), max_tokens_field="max_tokens",
                             logprobs=body.logprobs, logprobs_field="logprobs", num_prompts=num_prompts,
                             vocab_size=vocab_size, defaults=defaults)
    wanted = [k for k in (body.prompt_logprobs, body.logprobs if body.echo else None) if k is not None]
    if wanted or score_only:
        params = dataclasses.replace(params, prompt_logprobs=max(wanted, default=0),
                                     max_tokens=0 if score_only else params.max_tokens)
    return params


def _sorted_outputs(final: RequestOutput | None) -> list[CompletionOutput]:
    return sorted(final.outputs, key=lambda c: c.index) if final is not None else []


def _prompt_scored(output: RequestOutput | None) -> Scored:
    if output is None:
        return []
    scores = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
    return list(zip(output.prompt_token_ids, scores))


def _logprobs(scored: Scored, text_offset: int, k: int | None, tokenizer: Any) -> CompletionLogprobs | None:
    """OpenAI's logprobs object; a token without scores (a prompt's first) gets null entries."""
    if k is None:
        return None
    result = CompletionLogprobs()
    for token_id, position in scored:
        chosen = position[token_id] if position is not None else None
        text = token_text(token_id, chosen, tokenizer) if chosen is not None else _decode(token_id, tokenizer)
        result.tokens.append(text)
        result.token_logprobs.append(finite(chosen.logprob) if chosen is not None else None)
        if position is None:
            result.top_logprobs.append(None)
        else:
            top = {token_text(tid, lp, tokenizer): finite(lp.logprob) for tid, lp in top_entries(position, k)}
            top.setdefault(text, finite(chosen.logprob))
            result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result


def _decode(token_id: int, tokenizer: Any) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else str(token_id)


def _vllm_prompt_logprobs(output: RequestOutput | None, tokenizer: Any) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's shape: per prompt token, None for the first, else token id -> logprob, rank, text."""
    result: list[dict[str, PromptLogprob] | None] = []
    for _, position in _prompt_scored(output):
        result.append(None if position is None else {
            str(tid): PromptLogprob(logprob=finite(lp.logprob), rank=lp.rank,
                                    decoded_token=token_text(tid, lp, tokenizer))
            for tid, lp in position.items()})
    return result


async def _stream(state: ServerState, job: Job, body: CompletionRequest) -> AsyncIterator[str]:
    created = int(time.time())
    tokenizer = state.engine.engine.tokenizer
    n = job.params.n
    text_offsets: dict[int, int] = {}        # choice index -> characters sent so far
    finished: set[int] = set()
    finals: dict[str, RequestOutput] = {}

    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, completion: CompletionOutput | None,
              finish_reason: str | None, prompt_logprobs: list | None = None,
              prompt_token_ids: list[int] | None = None) -> str:
        choice = {"index": index, "text": text,
                  "logprobs": logprobs.model_dump() if logprobs is not None else None,
                  "finish_reason": finish_reason}
        if finish_reason is not None and completion is not None:
            choice["stop_reason"] = completion.stop_reason
        if prompt_logprobs is not None:
            choice["prompt_logprobs"] = [p if p is None else {t: lp.model_dump() for t, lp in p.items()}
                                         for p in prompt_logprobs]
        if body.return_token_ids:
            if prompt_token_ids is not None:
                choice["prompt_token_ids"] = prompt_token_ids
            choice["token_ids"] = list(completion.token_ids_delta) if completion is not None else []
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
                # A model without a tokenizer has no text: its tokens still stream, one chunk per step.
                # So do tokens whose text is not complete yet when they are asked for.
                if not (completion.text_delta or completion.finished or (
                        (body.logprobs is not None or body.return_token_ids or tokenizer is None)
                        and completion.token_ids_delta)):
                    continue
                text, scored, prompt_logprobs, prompt_ids = completion.text_delta, [], None, None
                if index not in text_offsets:   # the choice's first chunk carries the prompt
                    text_offsets[index] = 0
                    if body.return_token_ids:
                        prompt_ids = list(job.prompts[prompt_index][1])
                    if body.echo:
                        text = job.prompts[prompt_index][0] + text
                        scored = _prompt_scored(output)
                    if body.prompt_logprobs is not None:
                        prompt_logprobs = _vllm_prompt_logprobs(output, tokenizer)
                end = len(completion.token_ids)
                scored += positions(completion, end - len(completion.token_ids_delta), end)
                logprobs = _logprobs(scored, text_offsets[index], body.logprobs, tokenizer)
                text_offsets[index] += len(text)
                if completion.finished:
                    finished.add(index)
                yield chunk(index, text, logprobs, completion, completion.finish_reason, prompt_logprobs, prompt_ids)
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
