"""The HTTP routes. Handlers stay thin: parsing is pydantic's, checks are params.py's,
generation is serving_*.py's."""
from __future__ import annotations

import secrets
from importlib import metadata

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ondo.server.errors import APIError, bad_request
from ondo.server.params import chat_prompt_ids, check_token_ids
from ondo.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                  CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse,
                                  ModelCard, ModelList, TokenizeRequest, TokenizeResponse)
from ondo.server.serving import ServerState
from ondo.server.serving_chat import create_chat_completion
from ondo.server.serving_completion import create_completion
from ondo.server.protocol_anthropic import AnthropicError, AnthropicRoute, MessagesRequest, MessagesResponse
from ondo.server.protocol_responses import ResponseObject, ResponsesRequest
from ondo.server.serving_messages import create_message
from ondo.server.serving_responses import create_response, get_response

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)}
_STREAM = {"content": {"text/event-stream": {"schema": {"type": "string"}}},
           "description": "The response, or with stream=true server-sent events ending in `data: [DONE]`."}


def state_of(request: Request) -> ServerState:
    return request.app.state.ondo


def require_api_key(request: Request, authorization: str | None = Header(
        None, description="`Bearer <key>` when the server was started with an API key.")) -> None:
    expected = state_of(request).api_key
    if expected is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected.encode()):
        raise APIError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


router = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)], responses=_ERRORS)


@router.get("/health", summary="200 once the model is loaded, 503 before", responses={503: {"model": ErrorResponse}})
def health(request: Request) -> dict[str, str]:
    state_of(request).check_ready()
    return {"status": "ok"}


@router.get("/version")
def version() -> dict[str, str]:
    try:
        return {"version": metadata.version("ondo")}
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        from ondo import __version__

        return {"version": __version__}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@api.get("/v1/models")
def list_models(request: Request) -> ModelList:
    state = state_of(request)
    state.check_ready()
    from ondo.server.serving_lora import lora_model_cards

    return ModelList(data=[ModelCard(id=state.model_name, max_model_len=state.max_model_len),
                           *lora_model_cards(state, ModelCard)])


@api.post("/v1/completions", response_model=CompletionResponse, responses={200: _STREAM})
async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
    return await create_completion(state_of(request), body, request)


@api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={200: _STREAM})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletionResponse | StreamingResponse:
    return await create_chat_completion(state_of(request), body, request)


@api.post("/tokenize", summary="Token ids of a prompt, or of a conversation through the chat template")
def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = state_of(request)
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of 'prompt' and 'messages'", "prompt")
    if body.messages is not None:
        tokens = chat_prompt_ids(body, state.tokenizer)
    else:
        tokens = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens)


@api.post("/detokenize")
def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = state_of(request)
    state.check_model(body.model)
    check_token_ids(body.tokens, state.engine.engine.vocab_size, "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))


# ---- other dialects: OpenAI's Responses API, Anthropic's Messages API ---------------------------

_EVENTS = "With stream=true, server-sent events named after their `type` ({})."


@api.post("/v1/responses", response_model=ResponseObject, tags=["OpenAI Responses"],
          summary="OpenAI's Responses API: text or messages in, one assistant message out",
          responses={200: {**_STREAM, "description": _EVENTS.format("response.created ... response.completed")}})
async def responses(body: ResponsesRequest, request: Request) -> ResponseObject | StreamingResponse:
    return await create_response(state_of(request), body, request)


@api.get("/v1/responses/{response_id}", response_model=ResponseObject, tags=["OpenAI Responses"],
         summary="A stored response (kept in memory, least recently used forgotten first)")
def retrieve_response(response_id: str, request: Request) -> ResponseObject:
    return get_response(state_of(request), response_id)


def require_anthropic_api_key(request: Request, x_api_key: str | None = Header(
        None, description="The API key, as Anthropic's clients send it (Authorization: Bearer works too)."),
        authorization: str | None = Header(None)) -> None:
    expected = state_of(request).api_key
    if expected is None:
        return
    scheme, _, bearer = (authorization or "").partition(" ")
    given = x_api_key if x_api_key is not None else bearer if scheme.lower() == "bearer" else ""
    if not secrets.compare_digest(given.strip().encode(), expected.encode()):
        raise APIError(401, "a valid API key is required: send the header 'x-api-key: <key>' "
                            "(or 'Authorization: Bearer <key>')", code="invalid_api_key")


anthropic = APIRouter(route_class=AnthropicRoute, dependencies=[Depends(require_anthropic_api_key)],
                      tags=["Anthropic Messages"],
                      responses={status: {"model": AnthropicError} for status in (400, 401, 404, 429, 503)})


@anthropic.post("/v1/messages", response_model=MessagesResponse,
                summary="Anthropic's Messages API: system + messages in, one text block out",
                responses={200: {**_STREAM, "description": _EVENTS.format(
                    "message_start, content_block_start, ping, content_block_delta ..., content_block_stop, "
                    "message_delta, message_stop")}})
async def messages(body: MessagesRequest, request: Request) -> MessagesResponse | StreamingResponse:
    return await create_message(state_of(request), body, request)


router.include_router(anthropic)
