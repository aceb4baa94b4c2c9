"""The LoRA slot pool: adapters cached on the host once, `max_loras` of them resident on the device.

A request gets a slot when the scheduler admits it (`acquire`) and gives it back when it finishes or
is preempted (`release`). A slot held by a request is never evicted; a free slot goes to the next
adapter least recently used first. When every slot is held by running requests, the scheduler leaves
the request waiting (it is not failed). Each step, `prepare` writes every token's slot into the
static buffer the layers read (-1 = base model), so one batch mixes adapters and the base model.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, ContextManager

import torch
from torch import nn

from ondo.layers.linear import LMHead, VocabEmbedding, linear_layers
from ondo.lora.adapter import LoRAAdapter, LoRAError, map_to_model, read_peft_adapter
from ondo.lora.layers import LoRALinear, LoRAStepState, token_spans
from ondo.lora.request import LoRARequest


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device):
        self.model, self.max_loras, self.max_rank, self.device = model, max_loras, max_rank, device
        self.state = LoRAStepState(max_loras, max_tokens, device)
        self.layers: dict[str, LoRALinear] = {}
        for name, layer in linear_layers(model):
            if isinstance(layer, (VocabEmbedding, LMHead)):
                continue
            layer.lora = self.layers[name] = LoRALinear(layer, self.state, max_loras, max_rank, dtype, device)
        if self.state.use_triton:
            self._compile_kernels()
        self.adapters: dict[str, tuple[LoRARequest, LoRAAdapter]] = {}   # host cache, by name
        self.slot_adapter: list[LoRAAdapter | None] = [None] * max_loras
        self.slot_users = [0] * max_loras
        self.lru: OrderedDict[int, None] = OrderedDict((slot, None) for slot in range(max_loras))
        self.default: LoRARequest | None = None      # applied to requests that name none (CLI --lora)
        self._lock = threading.Lock()                # the server loads/unloads from its own thread
        self._next_id = 1 << 30                      # ids for adapters registered by name only

    def _compile_kernels(self) -> None:
        """Compile the Triton kernels for every layer shape now: the first launch of a kernel must not
        happen while a CUDA graph is being captured, and a prefill should not wait for a compile. One
        call per row-tile size; no slot has tokens yet, so nothing is computed."""
        from ondo.lora.triton_ops import add_lora

        seen = set()
        for layer in self.layers.values():
            shape = (layer.lora_a.shape[1:], layer.lora_b.shape[1])
            if shape not in seen:
                seen.add(shape)
                for tokens in (1, 65, 513):
                    x = torch.zeros(tokens, layer.lora_a.shape[2], dtype=layer.lora_a.dtype, device=self.device)
                    out = torch.zeros(tokens, layer.lora_b.shape[1], dtype=layer.lora_a.dtype, device=self.device)
                    add_lora(x, layer.lora_a, layer.lora_b, self.state.token_groups, out)

    def graph_variants(self) -> dict[str, Callable[[], ContextManager]]:
        """The decode graph sets to capture: with the LoRA kernels and without (base-model steps)."""
        return {"lora": lambda: self.state.graph_variant(True), "base": lambda: self.state.graph_variant(False)}

    def step_variant(self) -> str:
        """Which graph set this step replays."""
        return "lora" if self.state.spans else "base"

    # ---- the adapter registry (host) -------------------------------------------------------------

    def add_adapter(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read, check and cache an adapter (once per name and path); LoRAError when it does not fit."""
        with self._lock:
            known = self.adapters.get(lora_request.lora_name)
            if known is not None and known[0].lora_path == lora_request.lora_path:
                return known[1]
        adapter = map_to_model(read_peft_adapter(lora_request.lora_name, lora_request.lora_path),
                               self.model, self.max_rank)
        with self._lock:
            self.adapters[lora_request.lora_name] = (lora_request, adapter)
        return adapter

    def register(self, name: str, path: str) -> LoRARequest:
        """An adapter known by name only (server, CLI): it gets an id of its own."""
        with self._lock:
            self._next_id += 1
            lora_id = self._next_id
        lora_request = LoRARequest(name, lora_id, str(path))
        self.add_adapter(lora_request)
        return lora_request

    def remove_adapter(self, name: str) -> bool:
        """Forget an adapter; running requests keep their slot until they finish, then it is reused."""
        with self._lock:
            known = self.adapters.pop(name, None)
            if known is not None:
                for slot, adapter in enumerate(self.slot_adapter):
                    if adapter is known[1] and self.slot_users[slot] == 0:
                        self.slot_adapter[slot] = None
        return known is not None

    def request_for(self, name: str) -> LoRARequest | None:
        known = self.adapters.get(name)
        return known[0] if known is not None else None

    def names(self) -> list[str]:
        return list(self.adapters)

    # ---- slots (engine thread) -------------------------------------------------------------------

    def acquire(self, request) -> bool:
        """Give the request its adapter's slot, loading the adapter there if needed; False when every
        slot is held by running requests (the request waits)."""
        lora_request = request.lora_request
        if lora_request is None or request.lora_slot is not None:
            return True
        adapter = self._adapter_of(lora_request)
        slot = next((s for s, a in enumerate(self.slot_adapter) if a is adapter), None)
        if slot is None:
            slot = next((s for s in self.lru if self.slot_users[s] == 0), None)
            if slot is None:
                return False
            self._load_slot(slot, adapter)
        self.slot_users[slot] += 1
        self.lru.move_to_end(slot)
        request.lora_slot = slot
        return True

    def release(self, request) -> None:
        if request.lora_slot is not None:
            self.slot_users[request.lora_slot] -= 1
            request.lora_slot = None

    def _adapter_of(self, lora_request: LoRARequest) -> LoRAAdapter:
        known = self.adapters.get(lora_request.lora_name)
        if known is not None and known[0].lora_path == lora_request.lora_path:
            return known[1]
        return self.add_adapter(lora_request)   # unloaded while the request waited: read it again

    def _load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        for name, layer in self.layers.items():
            layer.set_slot(slot, adapter.layers.get(name))
        self.slot_adapter[slot] = adapter

    # ---- the step ----------------------------------------------------------------------------------

    def prepare(self, schedule) -> None:
        """This step's token slots from a SchedulerOutput (`scheduled` items: `request`, `num_new_tokens`)."""
        self.write_token_slots([-1 if item.request.lora_slot is None else item.request.lora_slot
                                for item in schedule.scheduled],
                               [item.num_new_tokens for item in schedule.scheduled])

    def write_token_slots(self, seq_slots: list[int], query_lens: list[int]) -> None:
        """Which rows of the step's tokens use which slot (its sequence's; -1 = base model), for the
        grouped GEMMs and, on the GPU, in the device buffer the kernels read."""
        spans = token_spans(seq_slots, query_lens)
        self.state.set_spans(spans)
        if spans and self.state.token_groups is not None:
            self.state.token_groups.write(spans)


def build_lora_manager(config, model: nn.Module, dtype: torch.dtype, device: torch.device,
                       max_model_len: int) -> LoRAManager | None:
    """The engine's manager when `enable_lora`, with the adapters named at start-up registered."""
    if not config.enable_lora:
        return None
    if getattr(config, "tensor_parallel_size", 1) > 1:
        raise LoRAError("enable_lora does not work with tensor_parallel_size > 1 yet: "
                        f"got tensor_parallel_size={config.tensor_parallel_size}")
    rank = config.max_lora_rank
    max_tokens = max(config.max_num_batched_tokens or 8192, max_model_len, config.max_num_seqs)
    manager = LoRAManager(model, config.max_loras, rank, max_tokens, dtype, device)
    for name, path in config.lora_modules:
        manager.register(name, path)
    if config.default_lora is not None:
        manager.default = manager.request_for(config.default_lora)
    return manager


def resolve_lora_request(manager: LoRAManager | None, lora_request) -> LoRARequest | None:
    """The adapter a new request runs with, read and checked now so a bad one fails at add time."""
    if manager is None:
        if lora_request is not None:
            raise LoRAError("a lora_request was given but the engine was started without LoRA: "
                            "pass enable_lora=True (ondo serve: --lora-modules)")
        return None
    lora_request = lora_request or manager.default
    if lora_request is None:
        return None
    if not isinstance(lora_request, LoRARequest):
        raise LoRAError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
    manager.add_adapter(lora_request)
    return lora_request
