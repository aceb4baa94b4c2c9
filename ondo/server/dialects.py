"""What the Responses and Anthropic Messages endpoints share: their options become SamplingParams
under the request's own field names, their conversations go through the chat template, and one
engine request runs per call (these APIs return a single candidate)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from ondo.outputs import CompletionOutput, RequestOutput
from ondo.sampling_params import SamplingParams, SamplingParamsError
from ondo.server.errors import APIError, bad_request, param_of
from ondo.server.params import chat_prompt_ids, check_context
from ondo.server.protocol import ChatCompletionRequest, ChatMessage
from ondo.server.serving import (Job, ServerState, collect_finals, job_outputs, start_job,
                                 until_disconnected)


def dialect_sampling_params(options: dict[str, tuple[str, Any]], max_tokens: int | None,
                            max_tokens_field: str, vocab_size: int) -> SamplingParams:
    """SamplingParams from `options` (SamplingParams field -> (the request's field, value); None
    values are left at their defaults). A bad value is a 400 naming the request's own field."""
    kwargs = {name: value for name, (_, value) in options.items() if value is not None}
    kwargs["max_tokens"] = max_tokens      # None here means: up to the end of the context
    renamed = {name: field for name, (field, _) in options.items()}
    renamed["max_tokens"] = max_tokens_field
    try:
        params = SamplingParams(**kwargs)
        params.check_token_ids(vocab_size)
    except SamplingParamsError as exc:
        message = str(exc)
        param = param_of(message, set(renamed))
        field = renamed.get(param, param)
        if param is not None and field != param:
            message = message.replace(param, field, 1)
        raise bad_request(message, field) from None
    return params


def conversation_prompt_ids(state: ServerState, messages: list[dict[str, str]], field: str,
                            continue_final_message: bool = False) -> list[int]:
    """[{"role", "content": text}, ...] rendered by the model's chat template, as token ids;
    with `continue_final_message`, the last (assistant) message is continued, not closed."""
    request = ChatCompletionRequest.model_construct(
        messages=[ChatMessage.model_construct(role=m["role"], content=m["content"], name=None) for m in messages],
        add_generation_prompt=not continue_final_message, continue_final_message=continue_final_message,
        chat_template_kwargs=None)
    try:
        return chat_prompt_ids(request, state.tokenizer)
    except APIError as exc:
        exc.param = field
        raise


@dataclass
class Generation:
    """One prompt running in the engine for a Responses or Messages call."""
    job: Job
    prompt_ids: list[int]

    @property
    def request_id(self) -> str:
        return self.job.streams[0].request_id


async def start_generation(state: ServerState, response_id: str, prompt_ids: list[int],
                           params: SamplingParams, prompt_field: str, max_tokens_field: str,
                           model: str | None = None) -> Generation:
    """`model`: the request's, which may name a LoRA adapter."""
    from ondo.server.serving_lora import lora_for

    check_context(len(prompt_ids), params.max_tokens, state.max_model_len, prompt_field, max_tokens_field)
    job = await start_job(state, response_id, [(None, prompt_ids)], params, lora_for(state, model))
    return Generation(job, prompt_ids)


async def final_output(state: ServerState, generation: Generation,
                       raw_request: Request) -> tuple[CompletionOutput, RequestOutput]:
    """The finished candidate and its RequestOutput (a 503 if the server stopped it first)."""
    finals = await until_disconnected(raw_request, collect_finals(state, generation.job))
    final = finals.get(generation.request_id)
    if final is None or not final.outputs or final.outputs[0].finish_reason in (None, "abort"):
        raise APIError(503, "the request was aborted: the server is shutting down")
    return final.outputs[0], final


async def output_deltas(state: ServerState,
                        generation: Generation) -> AsyncIterator[tuple[CompletionOutput, RequestOutput]]:
    """Each new state of the candidate while it runs (its text_delta is what is new)."""
    async for output in job_outputs(state, generation.job):
        if output.outputs:
            yield output.outputs[0], output


def reject_unsupported(body: Any, neutral: dict[str, tuple], names: tuple[str, ...]) -> None:
    """A 400 naming the first field in `names` set to something other than its neutral values;
    ondo does not implement those, and ignoring them would change what the client gets."""
    for name in names:
        value = getattr(body, name, None)
        if value is not None and value not in neutral.get(name, ()):
            raise bad_request(f"'{name}' is not supported by ondo on this endpoint; leave it out", name)
