"""What the API server process knows of a model that runs in the engine-core process: its tokenizer
(loaded here, without the weights) and the facts the core reported when it was ready."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ondo.config import EngineConfig


def load_front_end_tokenizer(config: EngineConfig) -> Any:
    """The tokenizer the Engine gets from `ondo.loader.load_model` for `config`, found the same
    way, without reading any weights (None for a model without one)."""
    from ondo.loader import _folder_tokenizer, builtin_model_path, dummy

    source = config.model
    if config.load_format == "dummy" and source in dummy.KNOWN_CONFIGS:
        return _folder_tokenizer(config, Path(config.tokenizer)) if config.tokenizer else None
    path = builtin_model_path() if source is None else Path(os.path.expanduser(source))
    if path.suffix == ".gguf":
        from ondo.tokenizer.tokenizer import load_tokenizer

        if config.tokenizer or config.chat_template:
            return load_tokenizer(config.tokenizer or path, chat_template=config.chat_template)
        return _gguf_tokenizer(path)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    return _folder_tokenizer(config, path)


def _gguf_tokenizer(path: Path) -> Any:
    """A GGUF file's tokenizer as `load_gguf` builds it (its model type picks the pre-tokenizer)."""
    import torch

    from ondo.loader.gguf import load_gguf

    return load_gguf(path, torch.float32).tokenizer   # the weights are read lazily: never here


@dataclass(frozen=True)
class CoreEngineInfo:
    """Stands in for `AsyncEngine.engine` (the Engine) where the server reads attributes of it."""
    tokenizer: Any
    vocab_size: int
    max_model_len: int
    model_name: str
    load_time_s: float
    config: EngineConfig
    pid: int                       # the engine-core process
