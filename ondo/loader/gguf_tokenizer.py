"""The tokenizer embedded in a GGUF file, converted once and cached.

transformers converts GGUF vocabulary metadata into a fast tokenizer exactly as
`AutoTokenizer.from_pretrained(folder, gguf_file=...)` does; ondo calls that conversion directly,
skipping the full-file config parse AutoTokenizer does first. SentencePiece GGUFs carry no merges,
so the conversion rebuilds them from the vocabulary: ~5-10 s for Gemma's 262k tokens. The result
is therefore saved as a regular tokenizer folder under the cache directory (`$ONDO_CACHE_DIR`,
default `~/.cache/ondo`; `ONDO_CACHE_DIR=off` disables it) and reloaded from there next time.
The cache key is the file's name, size and modification time plus the transformers version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import transformers

from ondo.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def tokenizer_cache_dir() -> Path | None:
    configured = os.environ.get("ONDO_CACHE_DIR")
    if configured is not None and configured.strip().lower() in ("", "off", "0", "none"):
        return None
    base = Path(configured).expanduser() if configured else Path.home() / ".cache" / "ondo"
    return base / "gguf-tokenizers"


def _cache_key(path: Path) -> str:
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return f"{path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _convert(path: Path):
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return TokenizersBackend.from_pretrained(str(path.parent), gguf_file=path.name)


def _load_cached(path: Path):
    """The converted tokenizer from the cache, converting and storing it on a miss."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cache_root = tokenizer_cache_dir()
    if cache_root is None:
        return _convert(path)
    entry = cache_root / _cache_key(path)
    if (entry / "tokenizer.json").is_file():
        try:
            return TokenizersBackend.from_pretrained(str(entry))
        except Exception as error:  # a damaged entry: rebuild it below
            logger.warning("ignoring the damaged tokenizer cache entry %s: %s", entry, error)
            shutil.rmtree(entry, ignore_errors=True)
    hf = _convert(path)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        # Write to a private folder first: a concurrent loader never sees a half-written entry.
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_root))
        hf.save_pretrained(str(staging))
        try:
            staging.rename(entry)
        except OSError:  # another process stored it first
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        logger.info("tokenizer cache not written (%s); the next load converts again", error)
    return hf


def load_gguf_tokenizer(path: str | os.PathLike, *, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer of a GGUF file (vocabulary, merges, special ids, BOS rule, chat template).

    `chat_template` (already resolved to jinja text) replaces the file's `tokenizer.chat_template`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return Tokenizer(_load_cached(path), chat_template=chat_template)
