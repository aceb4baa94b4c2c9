"""The HTTP API's request and response bodies: OpenAI's shapes plus ondo's decoding extras.

Requests forbid unknown fields and check types strictly (a string is not a number), so a typo
is a 400 that names the field instead of an option silently ignored. OpenAI fields that ondo
does not implement (audio, prediction, ...) are declared so that setting one gets a 400
saying so (see `unsupported_fields`). Value ranges are checked by `SamplingParams`, the single
place that knows them, so the API and the offline engine answer a bad value the same way.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


def _integral_float_to_int(value: Any) -> Any:
    # JSON clients sometimes send 5.0 for 5; anything else must already be an int.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral_float_to_int)]


def encodable(text: str) -> str:
    # JSON may carry lone UTF-16 surrogates ("\ud800"); no tokenizer can encode them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text must be valid Unicode: {exc.object[exc.start:exc.end]!r} at position "
                         f"{exc.start} is a lone surrogate") from None
    return text


Text = Annotated[str, AfterValidator(encodable)]


def _ranged(description: str | None = None, default: Any = None, **bounds: float) -> Any:
    """A field whose allowed range is documented in the OpenAPI schema (the playground reads it
    there) but checked by SamplingParams, so the error message is the engine's own."""
    names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    extra = {names[k]: v for k, v in bounds.items() if k in names}
    if "not_value" in bounds:
        extra["not"] = {"const": bounds["not_value"]}
    return Field(default, description=description, json_schema_extra=extra)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class JSONSchemaFormat(_Request):
    name: str = Field(description="A name for the schema (OpenAI requires one; ondo does not use it).")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema.")
    strict: bool | None = Field(None, description="Accepted; the output always follows the schema.")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = Field(None, description="With type json_schema.")


class SamplingFields(_Request):
    """Decoding options shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="Must name the served model when given.")
    n: Int = _ranged("Choices returned for each prompt.", 1, ge=1)
    best_of: Int | None = _ranged("Sequences generated; the n most likely are returned.", ge=1)
    temperature: float | None = _ranged("0 = greedy.", ge=0)
    top_p: float | None = _ranged("Nucleus sampling: the smallest set of tokens with this much mass.", gt=0, le=1)
    max_tokens: Int | None = _ranged("Most tokens to generate (prompt + max_tokens must fit the context).", ge=1)
    stop: Text | list[Text] | None = Field(None, description="Strings that end the generation (not returned).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Int | None = _ranged("Same seed, same tokens.", ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = _ranged(ge=-2, le=2)
    frequency_penalty: float | None = _ranged(ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100].")
    user: str | None = Field(None, description="Accepted for compatibility; not used.")
    # ondo's extras (vLLM's names).
    top_k: Int | None = _ranged("Keep the k most likely tokens; -1 = off.", ge=-1, not_value=0)
    min_p: float | None = _ranged("Drop tokens less likely than min_p x the most likely one.", ge=0, le=1)
    typical_p: float | None = _ranged("Locally typical sampling mass.", gt=0, le=1)
    repetition_penalty: float | None = _ranged("> 1 discourages tokens already in the prompt or output.", gt=0)
    no_repeat_ngram_size: Int | None = _ranged("No n-gram of this size occurs twice; 0 = off.", ge=0)
    min_tokens: Int | None = _ranged("EOS and stop tokens are blocked until this many tokens exist.", ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    bad_words: list[Text] | None = Field(None, description="Words never generated.")
    # Structured output: OpenAI's response_format, or one of vLLM's guided_* fields.
    response_format: ResponseFormat | None = Field(
        None, description="{\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
                          "{\"name\": ..., \"schema\": {...}}}: the output follows it.")
    guided_json: dict[str, Any] | Text | None = Field(None, description="A JSON schema the output follows.")
    guided_regex: Text | None = Field(None, description="A regex the whole output matches.")
    guided_choice: list[Text] | None = Field(None, description="The output is exactly one of these.")
    guided_grammar: Text | None = Field(None, description="A grammar the output follows: GBNF (rule `root`) or Lark (rule `start`).")


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[Int] | list[list[Int]]
    echo: bool = False
    logprobs: Int | None = _ranged("Top log-probs returned per token (with echo, prompt tokens too).", ge=0, le=20)
    suffix: str | None = Field(None, description="Not supported.")
    max_tokens: Int | None = _ranged("Most tokens to generate; 0 = only score the prompt (with echo or "
                                     "prompt_logprobs).", ge=0)
    prompt_logprobs: Int | None = _ranged("vLLM's extra: log-probs of every prompt token and its top k, "
                                          "returned in each choice's prompt_logprobs.", ge=0, le=20)
    return_token_ids: bool = Field(False, description="vLLM's extra: each choice also carries its token ids "
                                   "(token_ids, and prompt_token_ids); streamed, every chunk carries its new "
                                   "ids, even a token with no text yet, and the first the prompt's.")


class FunctionCall(_Request):
    name: str
    arguments: str = Field(description="The arguments as a JSON text.")


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[dict[str, Any]] | None = Field(
        None, description="Text, or a list of {\"type\": \"text\", \"text\": ...} parts.")
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant turn's tool calls.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")
    reasoning_content: str | None = Field(None, description="An assistant turn's reasoning (given to templates "
                                                            "that show it).")


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments.")
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Int | None = _ranged("Same as max_tokens (OpenAI's newer name).", ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = _ranged("Top log-probs returned per token; needs logprobs=true.", ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra variables for the chat template (e.g. enable_thinking).")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[ChatTool] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="auto (default with tools), none, required, or {\"type\": \"function\", "
                          "\"function\": {\"name\": ...}}; required and named calls are enforced by a grammar.")
    parallel_tool_calls: bool | None = Field(None, description="false = at most one call (with required).")
    return_token_ids: bool = Field(False, description="vLLM's extra: the response also carries the prompt's "
                                   "token ids (prompt_token_ids) and each choice its generated ids (token_ids); "
                                   "streamed, the first chunk carries the prompt's and every chunk its new ids.")
    # OpenAI fields ondo does not implement: a 400 when set to anything but their neutral value.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None


# Neutral values of unsupported fields: sending them changes nothing, so they are accepted.
_NEUTRAL = {
    "modalities": (["text"],),
    "service_tier": ("auto", "default"),
    "store": (False,),
}
_UNSUPPORTED = ("functions", "function_call", "audio", "modalities", "prediction", "reasoning_effort",
                "web_search_options", "service_tier", "store", "metadata", "suffix")


def unsupported_fields(request: BaseModel) -> list[str]:
    """Names of the OpenAI fields set on `request` that ondo does not implement."""
    names = []
    for name in _UNSUPPORTED:
        value = getattr(request, name, None)
        if value is not None and value not in _NEUTRAL.get(name, ()):
            names.append(name)
    return names


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Int]


# ---- responses -----------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(BaseModel):
    logprob: float | None
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(None, description="The stop string or token id that ended it.")
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        None, description="With prompt_logprobs: per prompt token (null for the first), token id -> log-prob.")
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids: the prompt's token ids.")
    token_ids: list[int] | None = Field(None, description="With return_token_ids: the generated token ids.")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, description="The model's reasoning (<think>...</think>), "
                                                            "when a reasoning parser splits it off.")
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = Field(None, description="With return_token_ids: the generated token ids.")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids: the prompt's token ids "
                                               "(the chat template applied).")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "ondo"
    max_model_len: int | None = None
    root: str | None = None       # a LoRA adapter's folder
    parent: str | None = None     # a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
