"""`LoRARequest`: which adapter a request runs with (vLLM's shape)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) named `lora_name`.

    `lora_int_id` is a positive number unique per adapter; it keys the prefix cache, so two adapters
    never share KV blocks."""
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ValueError("lora_path must name an adapter folder")
