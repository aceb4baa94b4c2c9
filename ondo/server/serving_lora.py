"""LoRA adapters over HTTP (vLLM's routes): each adapter is a model of its own in /v1/models
(`parent` = the base model) and is chosen by a request's `model` field;
POST /v1/load_lora_adapter and /v1/unload_lora_adapter change the set while the server runs.

Both engines (AsyncEngine in process, EngineCoreClient out of process) answer the same calls:
`lora_enabled`, `list_loras()`, `resolve_lora(name)`, `load_lora(name, path)`, `unload_lora(name)`,
and take the adapter as `add_request(..., lora_request=)`."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from ondo.engine.async_engine import EngineDeadError
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


def _resolve(state, model: str) -> LoRARequest | None:
    resolve = getattr(state.engine, "resolve_lora", None)   # engine stand-ins in tests have none
    return resolve(model) if resolve is not None and state.engine.is_ready else None


def is_lora_model(state, model: str) -> bool:
    return _resolve(state, model) is not None


def lora_for(state, model: str | None) -> LoRARequest | None:
    """The adapter a request's `model` names; None for the base model. 404 for an unknown name."""
    if model is None or model == state.model_name:
        return None
    lora_request = _resolve(state, model)
    if lora_request is None:
        state.check_model(model)   # raises the 404 in OpenAI's shape
    return lora_request


def lora_model_cards(state, card_type) -> list:
    list_loras = getattr(state.engine, "list_loras", None)
    if list_loras is None or not state.engine.is_ready:
        return []
    return [card_type(id=lora.lora_name, parent=state.model_name, max_model_len=state.max_model_len,
                      root=lora.lora_path) for lora in list_loras()]


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
             summary="Load a PEFT LoRA adapter folder as a new model named lora_name")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    state = state_of(request)
    engine = _lora_engine(state)
    if body.lora_name == state.model_name or engine.resolve_lora(body.lora_name) is not None:
        raise bad_request(f"the LoRA adapter '{body.lora_name}' is already loaded", "lora_name")
    try:
        await engine.load_lora(body.lora_name, body.lora_path)
    except (LoRAError, OSError) as error:
        raise bad_request(str(error), "lora_path") from None
    except EngineDeadError as error:
        raise APIError(503, str(error)) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             summary="Remove a LoRA adapter; requests already running with it finish")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    engine = _lora_engine(state_of(request))
    try:
        removed = await engine.unload_lora(body.lora_name)
    except EngineDeadError as error:
        raise APIError(503, str(error)) from None
    if not removed:
        raise APIError(404, f"the LoRA adapter '{body.lora_name}' is not loaded", param="lora_name",
                       code="model_not_found")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _lora_engine(state):
    state.check_ready()
    if not getattr(state.engine, "lora_enabled", False):
        raise bad_request("this server was started without LoRA: start it with --enable-lora "
                          "(or --lora-modules NAME=PATH)", "lora_name")
    return state.engine
