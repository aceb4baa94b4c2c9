"""What each tensor-parallel rank holds of a model, read from its config before anything is spawned, so
that a model that cannot be split fails with one line instead of inside N worker processes."""
from __future__ import annotations

from ondo.config import ConfigError


def attention_heads(hf_config) -> tuple[int, int]:
    """(query heads, key/value heads) of a transformers config, whatever the family calls them."""
    num_heads = getattr(hf_config, "num_attention_heads", None) or hf_config.n_head
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    return num_heads, num_kv_heads


def check_splittable(hf_config, tp_size: int) -> None:
    """The query heads must split evenly over the ranks; the kv heads too, or divide the ranks."""
    if tp_size == 1:
        return
    num_heads, num_kv_heads = attention_heads(hf_config)
    if num_heads % tp_size:
        raise ConfigError(f"the model's attention heads ({num_heads}) must be divisible by "
                          f"tensor_parallel_size ({tp_size})")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ConfigError(f"the model's key/value heads ({num_kv_heads}) must divide or be divisible by "
                          f"tensor_parallel_size ({tp_size})")


def read_hf_config(config):
    """The transformers config of `config.model` (folder, config.json, GGUF or dummy name), or None
    when it cannot be read cheaply; the loader reports a bad model later."""
    import os
    from pathlib import Path

    from ondo.loader import builtin_model_path, dummy

    if config.load_format == "dummy" and config.model in dummy.KNOWN_CONFIGS:
        return dummy.known_config(config.model)
    path = builtin_model_path() if config.model is None else Path(os.path.expanduser(config.model))
    try:
        if path.suffix == ".gguf":
            from ondo.loader.gguf_config import build_config
            from ondo.loader.gguf_reader import GGUFFile

            gguf = GGUFFile(path)   # descriptors only: the tensors stay on disk
            return build_config(gguf.metadata, set(gguf.tensors))
        from ondo.loader.hf import load_hf_config

        return load_hf_config(path.parent if path.is_file() else path)
    except (ImportError, OSError, ValueError, KeyError):
        return None
