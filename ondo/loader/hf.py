"""Hugging Face model folders: config.json, sharded or single *.safetensors (pytorch_model.bin as a
fallback) and generation_config.json. Tensors are read lazily (mmap), one at a time."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch


class ModelLoadError(ValueError):
    """The model folder or file is missing, malformed or does not match the model."""


def load_hf_config(folder: Path):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a model folder: it has no config.json")
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {error}") from None


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise ModelLoadError(f"{folder} has no weights: expected *.safetensors or pytorch_model.bin")


def iter_weight_file(path: Path, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, cast_float(f.get_tensor(name), dtype)
        return
    yield from iter_state_dict(torch_load(path), dtype)


def torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for unsafe or corrupt files
        raise ModelLoadError(f"cannot load {path} with weights_only=True: {str(error).splitlines()[0]}") from None


def iter_state_dict(state: dict, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            yield name, cast_float(tensor, dtype)


def checkpoint_names(folder: Path) -> set[str]:
    """Tensor names of a folder's safetensors files, read from their headers only."""
    names: set[str] = set()
    for path in folder.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


def load_generation_config(folder: Path) -> dict:
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"malformed {path}: {error}") from None


def cast_float(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` if it is a float tensor; None keeps the stored dtype."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
