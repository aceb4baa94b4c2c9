"""Reading a PEFT LoRA folder and mapping it onto ondo's layers.

PEFT saves `lora_A.weight` [r, in] and `lora_B.weight` [out, r] per target module under the HF module
name (`base_model.model.model.layers.0.self_attn.q_proj`). The delta of a module is
`scaling * B @ A` with `scaling = lora_alpha / r` (rsLoRA: `lora_alpha / sqrt(r)`); the layout is the
same for GPT-2's Conv1D modules (`fan_in_fan_out` only flips the base weight, which ondo stores
[out, in] already). q/k/v and gate/up live merged in ondo, so a module maps to (merged layer, shard).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ondo.layers.linear import Linear, LMHead, VocabEmbedding

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
SUPPORTED_TARGETS = ("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; "
                     "GPT-2's c_attn, c_proj, c_fc")


class LoRAError(ValueError):
    """An adapter cannot be used with this engine or model; the message names the adapter."""


@dataclass
class ModuleDelta:
    a: torch.Tensor        # [r, in] float32
    b: torch.Tensor        # [out, r] float32, scaling folded in

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class PeftAdapter:
    """An adapter as PEFT wrote it: per HF module name, its delta."""
    name: str
    path: str
    config: dict
    modules: dict[str, ModuleDelta] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((d.rank for d in self.modules.values()), default=0)


@dataclass
class LoRAAdapter:
    """An adapter mapped onto one ondo model: per `Linear` name, per shard (None = all rows), its delta."""
    name: str
    path: str
    rank: int
    layers: dict[str, dict[int | None, ModuleDelta]]


def read_peft_adapter(name: str, path: str | Path) -> PeftAdapter:
    folder = Path(path).expanduser()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise LoRAError(f"lora '{name}': {folder} is not a PEFT adapter folder (no adapter_config.json)")
    config = json.loads(config_file.read_text())
    _check_config(name, config)
    tensors = _read_tensors(name, folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(_PREFIX))
        if match is None:
            raise LoRAError(f"lora '{name}': tensor {key!r} is not a LoRA A/B matrix ondo can apply "
                            f"(embedding LoRA, DoRA and modules_to_save are not supported)")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    adapter = PeftAdapter(name, str(folder), config)
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise LoRAError(f"lora '{name}': {module} has lora_{'A' if 'A' in pair else 'B'} but not its partner")
        a, b = pair["A"].float(), pair["B"].float()
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoRAError(f"lora '{name}': {_leaf(module)} A is {list(a.shape)} and B is {list(b.shape)}; "
                            f"A must be [r, in] and B [out, r]")
        adapter.modules[module] = ModuleDelta(a, b * _scaling(config, module, a.shape[0]))
    if not adapter.modules:
        raise LoRAError(f"lora '{name}': the adapter at {folder} holds no LoRA weights")
    return adapter


def map_to_model(adapter: PeftAdapter, model: nn.Module, max_rank: int) -> LoRAAdapter:
    """Check every module against the base model and key it by ondo's layer and shard."""
    name = adapter.name
    if adapter.rank > max_rank:
        raise LoRAError(f"lora '{name}' has rank {adapter.rank}, more than max_lora_rank ({max_rank}): "
                        f"start the engine with max_lora_rank >= {adapter.rank}")
    from ondo.models.weights import _stacked_target

    modules = dict(model.named_modules())
    stacked = getattr(model, "stacked_params", None) or {}
    layers: dict[str, dict[int | None, ModuleDelta]] = {}
    for hf_module, delta in adapter.modules.items():
        target = _stacked_target(hf_module + ".weight", stacked)
        layer_name, shard = (target[0], target[1]) if target else (hf_module, None)
        layer = modules.get(layer_name)
        if not isinstance(layer, Linear) or isinstance(layer, (VocabEmbedding, LMHead)):
            raise LoRAError(f"lora '{name}': target module '{_leaf(hf_module)}' ({hf_module}) cannot be mapped "
                            f"onto this model: ondo adds LoRA to {SUPPORTED_TARGETS}")
        leaf = _leaf(hf_module)
        if delta.a.shape[1] != layer.in_features:
            raise LoRAError(f"lora '{name}': {leaf} A is {list(delta.a.shape)} but the base's {leaf} takes "
                            f"{layer.in_features} inputs")
        rows = layer.out_sizes[shard] if shard is not None else layer.out_features
        if delta.b.shape[0] != rows:
            raise LoRAError(f"lora '{name}': {leaf} B is {list(delta.b.shape)} but the base's {leaf} gives "
                            f"{rows} outputs")
        layers.setdefault(layer_name, {})[shard] = delta
    return LoRAAdapter(name, adapter.path, adapter.rank, layers)


def _check_config(name: str, config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"lora '{name}': peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise LoRAError(f"lora '{name}': DoRA adapters (use_dora=true) are not supported")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"lora '{name}': bias must be 'none', got {config.get('bias')!r}")
    if config.get("modules_to_save"):
        raise LoRAError(f"lora '{name}': modules_to_save ({config['modules_to_save']}) is not supported")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise LoRAError(f"lora '{name}': r must be an int >= 1, got {config.get('r')!r}")


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_tensors(name: str, folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "adapter_model.safetensors"))
    if (folder / "adapter_model.bin").is_file():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise LoRAError(f"lora '{name}': {folder} has no adapter_model.safetensors (or adapter_model.bin)")


def _leaf(module: str) -> str:
    return module.rpartition(".")[2]
