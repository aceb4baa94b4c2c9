"""From an API request to what the engine takes: prompt token ids and SamplingParams.

Everything that can be wrong with a request is found here, before the engine sees it, and
answered with a 400 that names the field: option ranges (through SamplingParams), prompts that
do not fit the context, token ids outside the vocabulary, unsupported OpenAI fields, and a bad
schema, regex or grammar in response_format / guided_*.
"""
from __future__ import annotations

import json
from typing import Any

import jinja2

from ondo.sample.structured import StructuredOutputError, StructuredOutputsParams
from ondo.sampling_params import SamplingParams, SamplingParamsError
from ondo.server.errors import APIError, bad_request, param_of
from ondo.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    encodable,
    unsupported_fields,
)

# A request fans out into prompts x best_of sequences; bound it so one call cannot fill the server.
MAX_SEQUENCES_PER_REQUEST = 256
MAX_LOGPROBS = 20

# Request fields handed to SamplingParams under the same name when set.
_PASSED_THROUGH = ("n", "best_of", "temperature", "top_p", "stop", "seed", "presence_penalty",
                   "frequency_penalty", "logit_bias", "top_k", "min_p", "typical_p",
                   "repetition_penalty", "no_repeat_ngram_size", "min_tokens", "ignore_eos",
                   "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output",
                   "bad_words")
# Arguments of apply_chat_template that chat_template_kwargs must not override.
_RESERVED_TEMPLATE_KWARGS = {"messages", "add_generation_prompt", "continue_final_message",
                             "tools", "tokenize", "conversation", "return_dict"}


def check_supported(request: SamplingFields) -> None:
    unsupported = unsupported_fields(request)
    if unsupported:
        name = unsupported[0]
        raise bad_request(f"'{name}' is not supported by ondo; leave it out", name)
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")


# Request fields that ask for structured output, and the StructuredOutputsParams field each fills.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(request: Any) -> StructuredOutputsParams | None:
    """The constraint of response_format or one guided_* field; a 400 naming the field when it is
    invalid or when several are given."""
    given = [name for name in _GUIDED if getattr(request, name, None) is not None]
    response_format = getattr(request, "response_format", None)
    if response_format is not None and response_format.type != "text":
        given.insert(0, "response_format")
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"give one of response_format (json_object / json_schema), "
                          f"{', '.join(_GUIDED)}; got {given[0]} and {given[1]}", given[1])
    name = given[0]
    if name == "response_format":
        if response_format.type == "json_object":
            kwargs: dict[str, Any] = {"json_object": True}
        elif response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise bad_request("response_format.json_schema.schema is required with type json_schema",
                              "response_format")
        else:
            kwargs = {"json": response_format.json_schema.schema_}
        field = "response_format.json_schema.schema" if "json" in kwargs else "response_format"
    else:
        kwargs, field = {_GUIDED[name]: getattr(request, name)}, name
    try:
        return StructuredOutputsParams(**kwargs)
    except StructuredOutputError as exc:
        # "structured_outputs.json is not ..." -> "guided_json is not ...": the request's own field.
        message = str(exc)
        if exc.field is not None:
            message = message.replace(f"structured_outputs.{exc.field}", field, 1)
        raise bad_request(message, name) from None


# The model's generation_config.json options that become defaults of requests (as vLLM does).
MODEL_SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def model_sampling_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The sampling options the model's authors chose (generation_config.json), as SamplingParams
    keywords; a request's own value wins over each. transformers' top_k=0 means off (-1)."""
    defaults = {k: generation_config[k] for k in MODEL_SAMPLING_DEFAULTS if generation_config.get(k) is not None}
    if defaults.get("top_k") == 0:
        defaults["top_k"] = -1
    return defaults


def sampling_params(request: SamplingFields, *, max_tokens: int | None, max_tokens_field: str,
                    logprobs: int | None, logprobs_field: str, vocab_size: int,
                    num_prompts: int = 1, structured: StructuredOutputsParams | None = None,
                    defaults: dict[str, Any] | None = None) -> SamplingParams:
    """The request's SamplingParams; a bad value is a 400 naming the request's own field.
    `structured`: a constraint decided by the caller (a forced tool call) instead of the request's.
    `defaults`: values for the options the request leaves unset (the model's generation config)."""
    kwargs: dict[str, Any] = {name: getattr(request, name) for name in _PASSED_THROUGH
                              if getattr(request, name) is not None}
    for name, value in (defaults or {}).items():
        kwargs.setdefault(name, value)
    kwargs["max_tokens"] = max_tokens
    kwargs["structured_outputs"] = structured if structured is not None else structured_outputs(request)
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    # SamplingParams speaks of best_of even when the client only set n.
    renamed = {"max_tokens": max_tokens_field, "logprobs": logprobs_field,
               "best_of": "best_of" if request.best_of is not None else "n"}
    try:
        params = SamplingParams(**kwargs)
        params.check_token_ids(vocab_size)
    except SamplingParamsError as exc:
        param = param_of(str(exc), set(_PASSED_THROUGH) | set(renamed))
        raise bad_request(_rename_in_message(str(exc), param, renamed), renamed.get(param, param)) from None
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise bad_request(f"{logprobs_field} must be in [0, {MAX_LOGPROBS}], got {logprobs}", logprobs_field)
    sequences = params.best_of * num_prompts
    if sequences > MAX_SEQUENCES_PER_REQUEST:
        raise bad_request(
            f"a request may generate at most {MAX_SEQUENCES_PER_REQUEST} sequences "
            f"(prompts x best_of), got {num_prompts} x {params.best_of} = {sequences}",
            "best_of" if request.best_of is not None else "n")
    if request.stream and params.best_of > params.n:
        raise bad_request(f"best_of > n needs stream=false (the best sequences are known only at "
                          f"the end), got n={params.n}, best_of={params.best_of}", "best_of")
    return params


def _rename_in_message(message: str, param: str | None, renamed: dict[str, str]) -> str:
    # Only the option names of the request's own API (logprobs -> top_logprobs for chat).
    target = renamed.get(param) if param in ("max_tokens", "logprobs") else None
    return message.replace(param, target, 1) if target and target != param else message


def completion_prompts(request: CompletionRequest, tokenizer: Any | None,
                       vocab_size: int) -> list[tuple[str | None, list[int]]]:
    """(prompt text or None, prompt token ids) for each prompt of a /v1/completions request."""
    prompt = request.prompt
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]  # one prompt as token ids
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt must not be empty", "prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                raise bad_request("this model has no tokenizer: send prompts as token id lists", "prompt")
            ids = tokenizer.encode(item)
            text = item
        else:
            ids = list(item)
            check_token_ids(ids, vocab_size, "prompt")
            text = None
        if not ids:
            raise bad_request("prompt must not be empty (it encodes to no tokens)", "prompt")
        prompts.append((text, ids))
    return prompts


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"{param} must hold token ids in [0, {vocab_size}), got {bad[0]}", param)


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int,
                  prompt_field: str, max_tokens_field: str) -> None:
    """A 400 when the prompt, or the prompt plus the tokens asked for, exceeds the context."""
    if prompt_len >= max_model_len:
        raise bad_request(
            f"the prompt has {prompt_len} tokens but this model's context holds {max_model_len}: "
            f"no room left to generate; shorten the prompt", prompt_field)
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"this model's context holds {max_model_len} tokens, but {prompt_len + max_tokens} were "
            f"asked for ({prompt_len} in the prompt + {max_tokens} {max_tokens_field}); set "
            f"{max_tokens_field} to at most {max_model_len - prompt_len}", max_tokens_field)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template wants them: text content only, "developer" as "system",
    tool call arguments as objects (templates write them with `tojson`)."""
    converted = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(
                        f"messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": <string>}}: "
                        f"only text is supported, got type {part.get('type')!r}", "messages")
                try:
                    texts.append(encodable(part["text"]))
                except ValueError as exc:
                    raise bad_request(f"messages[{i}].content[{j}].{exc}", "messages") from None
            content = "".join(texts)
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                 "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        for key in ("tool_call_id", "reasoning_content"):
            if getattr(message, key, None) is not None:
                entry[key] = getattr(message, key)
        if getattr(message, "tool_calls", None):
            entry["tool_calls"] = [_template_tool_call(call, f"messages[{i}].tool_calls[{j}]")
                                   for j, call in enumerate(message.tool_calls)]
        converted.append(entry)
    return converted


def _template_tool_call(call: Any, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments) if call.function.arguments.strip() else {}
    except json.JSONDecodeError as exc:
        raise bad_request(f"{where}.function.arguments must be a JSON text: {exc}", "messages") from None
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def chat_prompt_ids(request: ChatCompletionRequest | Any, tokenizer: Any, tool_plan: Any = None) -> list[int]:
    """The conversation rendered by the model's chat template, as token ids (400 if it can't be).
    `tool_plan` (tool_choice.ToolPlan): the tools to show the model, if any."""
    if not request.messages:
        raise bad_request("messages must hold at least one message", "messages")
    kwargs = dict(request.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if reserved:
        raise bad_request(f"chat_template_kwargs must not set {reserved[0]!r}; use the request "
                          f"field of that name", "chat_template_kwargs")
    try:
        from ondo.server.tool_choice import template_messages

        messages = template_messages(chat_messages(request.messages), tool_plan)
        tools = tool_plan.tools if tool_plan is not None and not tool_plan.describe_in_system else None
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message, tools=tools, **kwargs)
    except APIError:
        raise
    except (ValueError, TypeError, KeyError, jinja2.TemplateError) as exc:
        raise bad_request(f"the chat template could not render these messages: {exc}", "messages") from None
