"""The messages between the API server process and the engine-core process: msgspec Structs sent as
msgpack, plain data only (no pickled objects, so a message never runs code when it is read).

Front end -> core: `AddRequest` (prompts as token ids), `Abort`, `StopSequences` (ended by a stop
string, which the front end matches), `AbortAll`, `Shutdown`, `LoadLoRA`, `UnloadLoRA`.
Core -> front end: `Ready` (or `LoadFailed`) once, then `CoreOutputs` (adds acknowledged or refused,
one step's `SequenceDelta`s: token ids, never text, a stats snapshot), `LoRAReply` (one per LoadLoRA / UnloadLoRA, by call
id, with the loaded adapters afterwards), and `Dead` if the loop failed fatally.

SamplingParams crosses as `SamplingParamsData` (its fields, checked again in the core on rebuild);
its logits processors cross as importable names "package.module:function", resolved in the core.
The front end detokenizes and builds the RequestOutputs (ondo/engine/text_output.py).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Union

import msgspec

from ondo.engine.output_processor import SequenceDelta
from ondo.sample.structured import StructuredOutputsParams
from ondo.sampling_params import SamplingParams, SamplingParamsError


class SamplingParamsData(msgspec.Struct, forbid_unknown_fields=True):
    """SamplingParams' init fields as plain data (a test keeps the two field lists equal)."""
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    bad_words: list[str] = []
    bad_words_ids: list[list[int]] = []
    logit_bias: dict[int, float] = {}
    allowed_token_ids: list[int] | None = None
    no_repeat_ngram_size: int = 0
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    max_length: int | None = None
    min_length: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    logits_processors: list[str] = []          # "package.module:function"
    do_sample: bool | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: dict[str, Any] | None = None   # StructuredOutputsParams' set field


class LoRAData(msgspec.Struct):
    """A LoRARequest's fields: an adapter folder, its name and id."""
    name: str
    id: int
    path: str


# ---- front end -> core -------------------------------------------------------------------------

class AddRequest(msgspec.Struct, tag="add"):
    request_id: str
    prompt: Union[str, list[int]]
    params: SamplingParamsData
    lora: LoRAData | None = None     # the adapter it runs with; None = the base model
    client: int = 0                  # which API server process sent it (its deltas go back there)


class LoadLoRA(msgspec.Struct, tag="load_lora"):
    """Read and register the adapter folder `path` as `name`; answered by a LoRAReply."""
    call_id: int
    name: str
    path: str
    client: int = 0


class UnloadLoRA(msgspec.Struct, tag="unload_lora"):
    """Forget the adapter `name` (running requests finish with it); answered by a LoRAReply."""
    call_id: int
    name: str
    client: int = 0


class Abort(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class AbortAll(msgspec.Struct, tag="abort_all"):
    """Abort every request of API server `client` quietly (graceful shutdown: it ends the streams itself)."""
    client: int = 0


class StopSequences(msgspec.Struct, tag="stop_sequences"):
    """Sequences (request id, index) that a stop string ended in the front end: free them."""
    sequences: list[tuple[str, int]]


class Shutdown(msgspec.Struct, tag="shutdown"):
    """Abort everything and exit with status 0."""


ToCore = Union[AddRequest, Abort, StopSequences, AbortAll, Shutdown, LoadLoRA, UnloadLoRA]


# ---- core -> front end -------------------------------------------------------------------------

class AddError(msgspec.Struct):
    """An add refused for that request alone; the client raises the matching exception."""
    request_id: str
    error_type: str        # the core's exception class name: "QueueFullError", "SamplingParamsError", ...
    message: str
    is_value_error: bool   # a ValueError in the core: bad input (the server answers 400)


class Ready(msgspec.Struct, tag="ready"):
    """The engine is built: what the front end needs to know about the model."""
    model_name: str
    max_model_len: int
    vocab_size: int
    load_time_s: float
    config: dict[str, Any]     # the EngineConfig's fields
    pid: int
    lora_enabled: bool = False
    loras: list[LoRAData] = []  # the adapters loaded at start (--lora-modules)


class LoadFailed(msgspec.Struct, tag="load_failed"):
    error_type: str
    message: str


class CoreOutputs(msgspec.Struct, tag="outputs"):
    added: list[str] = []                   # adds accepted since the last message
    add_errors: list[AddError] = []
    deltas: list[SequenceDelta] = []        # one step's news, per sequence
    stats: dict[str, Any] | None = None     # Engine.stats() when refreshed (every ~0.1 s at most)


class LoRAReply(msgspec.Struct, tag="lora_reply"):
    """The answer to LoadLoRA / UnloadLoRA `call_id`: error_type is None on success. The other API
    server processes get a copy with call_id -1, for the loaded set."""
    call_id: int
    loras: list[LoRAData]              # every adapter loaded now
    removed: bool = False              # UnloadLoRA: the adapter was loaded
    error_type: str | None = None      # the core's exception class name
    message: str = ""
    is_bad_adapter: bool = False       # LoRAError / OSError: the folder is not a usable adapter (400)


class Dead(msgspec.Struct, tag="dead"):
    """The core's loop failed fatally; the process exits with status 1 right after."""
    error_type: str
    message: str


FromCore = Union[Ready, LoadFailed, CoreOutputs, LoRAReply, Dead]


class Codec:
    """One side's encoder and decoder (msgspec reuses their buffers: keep one per socket owner)."""

    def __init__(self, incoming: Any) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(incoming)

    def encode(self, message: msgspec.Struct) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes) -> Any:
        return self._decoder.decode(data)


def core_codec() -> Codec:
    return Codec(ToCore)


def client_codec() -> Codec:
    return Codec(FromCore)


# ---- LoRARequest <-> plain data ------------------------------------------------------------------

def lora_to_data(lora_request: Any) -> LoRAData | None:
    if lora_request is None:
        return None
    return LoRAData(lora_request.lora_name, int(lora_request.lora_int_id), str(lora_request.lora_path))


def lora_from_data(data: LoRAData | None) -> Any:
    """The LoRARequest again (None for the base model)."""
    from ondo.lora.request import LoRARequest

    return None if data is None else LoRARequest(data.name, data.id, data.path)


# ---- SamplingParams <-> plain data ---------------------------------------------------------------

def params_to_data(params: SamplingParams) -> SamplingParamsData:
    """Raises SamplingParamsError for a logits processor the core could not import by name."""
    values = {f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingParams) if f.init}
    values["logits_processors"] = [processor_name(p, i) for i, p in enumerate(params.logits_processors)]
    structured = params.structured_outputs
    values["structured_outputs"] = (None if structured is None else
                                    {structured.kind: getattr(structured, structured.kind)})
    return SamplingParamsData(**values)


def params_from_data(data: SamplingParamsData) -> SamplingParams:
    """The SamplingParams again (validated again); raises SamplingParamsError for a processor name
    that does not import."""
    values = msgspec.structs.asdict(data)
    values["logits_processors"] = [resolve_processor(name) for name in data.logits_processors]
    if data.structured_outputs is not None:
        values["structured_outputs"] = StructuredOutputsParams(**data.structured_outputs)
    return SamplingParams(**values)


def processor_name(processor: Any, index: int = 0) -> str:
    """"package.module:function" of a module-level callable; the name must import back to it."""
    module, qualname = getattr(processor, "__module__", None), getattr(processor, "__qualname__", None)
    name = f"{module}:{qualname}"
    if not module or not qualname or "<" in qualname or module == "__main__":
        raise SamplingParamsError(
            f"logits_processors[{index}] must be a module-level function importable as "
            f"'package.module:function' to reach the engine process, got {processor!r}")
    try:
        same = resolve_processor(name) is processor
    except SamplingParamsError:
        same = False
    if not same:
        raise SamplingParamsError(
            f"logits_processors[{index}] must be importable as 'package.module:function' to reach "
            f"the engine process; {name!r} does not import to it, got {processor!r}")
    return name


def resolve_processor(name: str) -> Any:
    module_name, _, qualname = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, ValueError) as error:
        raise SamplingParamsError(
            f"logits_processors must name importable callables 'package.module:function', "
            f"got {name!r} ({type(error).__name__}: {error})") from None
    if not callable(target):
        raise SamplingParamsError(f"logits_processors must name callables, got {name!r}")
    return target
