"""A GGUF model's config read back without transformers.

Importing transformers costs a CPU process about 30 MB of RSS (its lazy module tables, and through it
huggingface_hub, httpx, yaml and some 200 more modules), a twelfth of what the built-in model runs in.
A GGUF file needs transformers only to build the config class its architecture's defaults live in, and
to convert its vocabulary (`gguf_tokenizer.py`). So the first load builds the transformers config as
usual and saves the value of each of its public attributes under `$ONDO_CACHE_DIR/gguf-configs`, and
later loads of the same file read them back into a `PlainConfig`: the same attribute values, no
transformers. The name of the saved file covers the file's metadata digest, its tensor names (the
biases the config records), the transformers version and the source of ondo's GGUF config mapping.

Only values JSON keeps exactly are saved (numbers, strings, lists, dicts with string keys); the rest
(transformers' pipeline-parallel plans, label maps, its per-layer views) are nothing ondo reads, and
reading one from a `PlainConfig` raises rather than falling back to a default. A config whose rope
needs transformers' frequency functions (linear, yarn, llama3 scaling) is not saved: `rotary.py`
hands those functions the config itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ondo.loader.gguf_tokenizer import cache_root

logger = logging.getLogger(__name__)


class PlainConfig(SimpleNamespace):
    """The public attributes of a transformers config, as plain values (`config.hidden_size`, ...)."""

    def __init__(self, attributes: dict[str, Any], left_out: list[str]):
        super().__init__(**attributes)
        object.__setattr__(self, "_left_out", frozenset(left_out))

    def __getattr__(self, name: str):
        if name in self.__dict__.get("_left_out", ()):
            raise RuntimeError(f"the config attribute {name!r} is not kept by PlainConfig (not a JSON value): "
                               "load the model with ONDO_CONFIG_CACHE=0")
        raise AttributeError(name)

    def __reduce__(self):   # pickled and copied as the two arguments it was made from
        attributes = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return type(self), (attributes, sorted(self._left_out))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({k: v for k, v in vars(self).items() if not k.startswith("_")}))


def cached_config(metadata: dict[str, Any], tensor_names: set[str], metadata_digest: str):
    """The config of a GGUF file: a `PlainConfig` read back when this file's was saved before, else the
    transformers config (`gguf_config.build_config`), saved for the next load where it can be."""
    path = _cache_path(metadata_digest, tensor_names) if enabled() else None
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
            return PlainConfig(saved["attributes"], saved["left_out"])
        except (OSError, ValueError, KeyError, TypeError) as error:   # damaged: build it again (and rewrite it)
            logger.debug("config cache %s unreadable (%s): building the config again", path, error)
    from ondo.loader.gguf_config import build_config

    config = build_config(metadata, tensor_names)
    if path is not None:
        _save(config, path)
    return config


def plain_attributes(config) -> tuple[dict[str, Any], list[str]] | None:
    """(attributes JSON keeps exactly, names of those it does not) of a transformers config; None when its
    rope needs transformers' frequency functions."""
    attributes, left_out = {}, []
    quiet = logging.getLogger("transformers")          # deprecated aliases warn when read
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        names = [name for name in dir(config) if not name.startswith("_")]
        values = {name: _value(config, name) for name in names}
    finally:
        quiet.setLevel(level)
    for name, value in values.items():
        if value is _UNREADABLE or callable(value):
            continue
        if _json_exact(value):
            attributes[name] = value
        else:
            left_out.append(name)
    if not _default_rope(attributes.get("rope_parameters")):
        return None
    return attributes, left_out


_UNREADABLE = object()


def _value(config, name: str):
    try:
        return getattr(config, name)
    except Exception:      # a property that only some configs can answer
        return _UNREADABLE


def enabled() -> bool:
    return os.environ.get("ONDO_CONFIG_CACHE", "1") != "0"


def _default_rope(params) -> bool:
    if not isinstance(params, dict):
        return False
    layers = params.values() if all(isinstance(v, dict) for v in params.values()) else [params]
    return all(p.get("rope_type", p.get("type", "default")) == "default" for p in layers)


def _json_exact(value) -> bool:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return False
    return _same(json.loads(text), value)


def _same(a, b) -> bool:
    """Equal and of the same types all the way down (a tuple is not a list, 1 is not 1.0 or True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)   # NaN


def _cache_path(metadata_digest: str, tensor_names: set[str]) -> Path | None:
    try:
        transformers_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None
    code = hashlib.sha256()
    for source in (Path(__file__).parent / "gguf_config.py", Path(__file__)):
        code.update(source.read_bytes())
    key = repr((metadata_digest, sorted(tensor_names), transformers_version, code.hexdigest()))
    return cache_root() / "gguf-configs" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _save(config, path: Path) -> None:
    plain = plain_attributes(config)
    if plain is None:
        return
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(json.dumps({"attributes": plain[0], "left_out": plain[1]}))
        os.replace(staging, path)
    except OSError as error:   # a read-only home, a full disk: build it each time
        logger.debug("config cache %s not written: %s", path, error)
    finally:
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)
