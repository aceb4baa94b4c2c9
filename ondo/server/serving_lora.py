"""LoRA adapters over HTTP (vLLM's routes): each adapter is a model of its own in /v1/models
(`parent` = the base model) and is chosen by a request's `model` field;
POST /v1/load_lora_adapter and /v1/unload_lora_adapter change the set while the server runs."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from ondo.lora.adapter import LoRAError
from ondo.lora.request import LoRARequest
from ondo.server.errors import APIError, bad_request
from ondo.server.protocol import ErrorResponse


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None


# The app adds the API-key check when it includes this router (routes.py imports the serving modules).
router = APIRouter(tags=["LoRA adapters"],
                   responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 503)})


def state_of(request: Request):
    return request.app.state.ondo


def _manager(state):
    return state.engine.engine.lora_manager if state.engine.is_ready else None


def is_lora_model(state, model: str) -> bool:
    manager = _manager(state)
    return manager is not None and manager.request_for(model) is not None


def lora_for(state, model: str | None) -> LoRARequest | None:
    """The adapter a request's `model` names; None for the base model. 404 for an unknown name."""
    if model is None or model == state.model_name:
        return None
    manager = _manager(state)
    lora_request = manager.request_for(model) if manager is not None else None
    if lora_request is None:
        state.check_model(model)   # raises the 404 in OpenAI's shape
    return lora_request


def bind_lora(state, request_id: str, lora_request: LoRARequest) -> None:
    """Tell the engine which adapter the request about to be added runs with."""
    state.engine.engine.lora_manager.assigned[request_id] = lora_request


def lora_model_cards(state, card_type) -> list:
    manager = _manager(state)
    if manager is None:
        return []
    return [card_type(id=name, parent=state.model_name, max_model_len=state.max_model_len,
                      root=manager.request_for(name).lora_path) for name in manager.names()]


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
             summary="Load a PEFT LoRA adapter folder as a new model named lora_name")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    state = state_of(request)
    manager = _lora_manager(state)
    if body.lora_name == state.model_name or manager.request_for(body.lora_name) is not None:
        raise bad_request(f"the LoRA adapter '{body.lora_name}' is already loaded", "lora_name")
    try:
        await asyncio.to_thread(manager.register, body.lora_name, body.lora_path)
    except (LoRAError, OSError) as error:
        raise bad_request(str(error), "lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             summary="Remove a LoRA adapter; requests already running with it finish")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    manager = _lora_manager(state_of(request))
    if not manager.remove_adapter(body.lora_name):
        raise APIError(404, f"the LoRA adapter '{body.lora_name}' is not loaded", param="lora_name",
                       code="model_not_found")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _lora_manager(state):
    state.check_ready()
    if getattr(state.engine, "out_of_process", False):
        raise bad_request("--engine-process does not serve LoRA adapters yet", "lora_name")
    manager = _manager(state)
    if manager is None:
        raise bad_request("this server was started without LoRA: start it with --enable-lora "
                          "(or --lora-modules NAME=PATH)", "lora_name")
    return manager
