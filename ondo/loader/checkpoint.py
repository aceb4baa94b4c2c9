"""A fine-tuned state dict over a base model folder (`LLM(model=base, checkpoint=path)`).

Training frameworks wrap the model: Lightning saves `{"state_dict": {"model.<hf name>": ...}}`,
DDP adds `module.`. The wrapping prefix is detected by which candidate makes the most keys match
the model's own parameter names, then stripped.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ondo.loader.hf import ModelLoadError, iter_state_dict, torch_load

_PREFIXES = ("", "model.", "module.", "model.module.", "module.model.", "_orig_mod.", "model._orig_mod.")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(isinstance(t, torch.Tensor) for t in state.values()):
        raise ModelLoadError(f"checkpoint {path} holds no state dict of tensors")
    return state


def strip_prefix(state: dict[str, torch.Tensor], expected_names: set[str]) -> dict[str, torch.Tensor]:
    def matches(prefix: str) -> int:
        return sum(1 for k in state if k.startswith(prefix) and k[len(prefix):] in expected_names)

    best = max(_PREFIXES, key=matches)
    return {k[len(best):] if k.startswith(best) else k: v for k, v in state.items()}


def iter_checkpoint(path: Path, expected_names: set[str], dtype: torch.dtype | None):
    return iter_state_dict(strip_prefix(read_checkpoint(path), expected_names), dtype)
