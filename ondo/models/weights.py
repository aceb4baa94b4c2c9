"""Copying HF-named checkpoint tensors into a model, merged projections included."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ondo.layers.linear import MergedLinear

# HF projection name -> (merged module name, shard index); shared by the Llama-like families.
LLAMA_STACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
# Buffers some checkpoints carry that ondo recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


class WeightShapeError(ValueError):
    pass


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 stacked: dict[str, tuple[str, int]] | None = None) -> set[str]:
    """Load (name, tensor) pairs; returns the model parameter names that were filled.

    Unknown names are collected and reported by the caller (the loader), never silently dropped:
    they come back as "unexpected:<name>" entries.
    """
    stacked = stacked or {}
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        target = _stacked_target(name, stacked)
        if target is not None:
            module_name, shard, param_name = target
            module = modules.get(module_name)
            if isinstance(module, MergedLinear):
                module.load_shard(param_name, shard, tensor.to(getattr(module, param_name).dtype))
                loaded.add(f"{module_name}.{param_name}")
                continue
        param = params.get(name)
        if param is None:
            loaded.add(f"unexpected:{name}")
            continue
        if param.shape != tensor.shape:
            raise WeightShapeError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                   f"model {tuple(param.shape)}")
        param.data.copy_(tensor)
        loaded.add(name)
    return loaded


def _stacked_target(name: str, stacked: dict[str, tuple[str, int]]):
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in stacked:
            merged, shard = stacked[part]
            return ".".join(parts[:i] + [merged]), shard, ".".join(parts[i + 1:])
    return None
