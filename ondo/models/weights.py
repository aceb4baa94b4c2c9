"""Copying HF-named checkpoint tensors into a model, merged projections and quantized layers included."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ondo.layers.linear import Linear, linear_layers

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
    """Load (name, tensor) pairs; returns the model's weight names (see `weight_names`) that were filled.

    A `Linear` takes its HF `weight`/`bias` through `Linear.load`, so its method stores it as it likes
    (a tensor here may also be a packed GGUF payload). Unknown names are collected and reported by the
    caller (the loader), never silently dropped: they come back as "unexpected:<name>" entries.
    """
    stacked = stacked or {}
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        module_name, shard, param_name = _stacked_target(name, stacked) or _plain_target(name)
        module = modules.get(module_name)
        if isinstance(module, Linear) and param_name in ("weight", "bias"):
            try:
                module.load(param_name, tensor, shard)
            except ValueError as error:
                raise WeightShapeError(f"{name}: {error}") from None
            loaded.add(f"{module_name}.{param_name}")
            continue
        param = params.get(name)
        if param is None:
            loaded.add(f"unexpected:{name}")
            continue
        if not isinstance(tensor, torch.Tensor):                 # a packed payload for a dense parameter
            tensor = tensor.dequantize()
        if param.shape != tensor.shape:
            raise WeightShapeError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                   f"model {tuple(param.shape)}")
        param.data.copy_(tensor)
        loaded.add(name)
    return loaded


def finish_loading(model: nn.Module) -> None:
    """Let every linear method repack or quantize what it staged while loading."""
    for _, layer in linear_layers(model):
        layer.finish_loading()


def weight_names(model: nn.Module) -> Iterator[str]:
    """The names a checkpoint fills, in the model's own spelling (merged projections not split).

    A `Linear` counts as `<name>.weight` (+ `.bias`) whatever its method stores; a tied LM head is
    the embedding module itself, so it is listed once.
    """
    linears = dict(linear_layers(model))
    for name, _ in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner not in linears:
            yield name
    for name, layer in linears.items():
        yield f"{name}.weight"
        if layer.bias is not None:
            yield f"{name}.bias"


def _plain_target(name: str) -> tuple[str, None, str]:
    module_name, _, param_name = name.rpartition(".")
    return module_name, None, param_name


def _stacked_target(name: str, stacked: dict[str, tuple[str, int]]):
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in stacked:
            merged, shard = stacked[part]
            return ".".join(parts[:i] + [merged]), shard, ".".join(parts[i + 1:])
    return None
