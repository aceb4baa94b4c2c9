"""The tokenizer embedded in a GGUF file.

transformers converts GGUF vocabulary metadata (tokens, merges or scores, token types, special
ids, the BOS rule, the chat template) into a fast tokenizer; ondo uses that conversion with the
tokenizer class `AutoTokenizer.from_pretrained(folder, gguf_file=...)` would pick for the model
type (GemmaTokenizer for Gemma, which also knows `<mask>`; Qwen2Tokenizer for Qwen; the generic
backend for Llama-family files), so ids and special tokens are exactly transformers'. Unlike
AutoTokenizer it does not first parse the whole file a second time to build a model config.

The conversion reads every token and merge of the file again (~0.35 s for the built-in model's
49,152-token vocabulary on a 2-core machine, a third of its load). So the converted tokenizer is
saved once (`save_pretrained`) under `$ONDO_CACHE_DIR` (default `~/.cache/ondo`), keyed by the
file's path, size and modification time and by the transformers and tokenizers versions, and later
loads read that folder (~0.12 s). A cache that cannot be written or read is skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from ondo.loader.gguf_config import GGUF_ARCHITECTURES
from ondo.loader.gguf_reader import read_architecture
from ondo.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def tokenizer_class_for(model_type: str | None):
    """The transformers tokenizer class AutoTokenizer uses for a GGUF of this HF model type."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    class_name = TOKENIZER_MAPPING_NAMES.get(model_type) if model_type else None
    tokenizer_class = tokenizer_class_from_name(class_name) if class_name else None
    if tokenizer_class is None or tokenizer_class.__name__ == "PythonBackend":
        return TokenizersBackend
    return tokenizer_class


def load_gguf_tokenizer(
    path: str | os.PathLike, *, chat_template: str | None = None, model_type: str | None = None
) -> Tokenizer:
    """The tokenizer of a GGUF file.

    `chat_template` (jinja text) replaces the file's `tokenizer.chat_template`; `model_type` (the HF
    model type, when the caller already knows it) saves reading the architecture from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if model_type is None:
        model_type = GGUF_ARCHITECTURES.get(read_architecture(path), (None,))[0]
    tokenizer_class = tokenizer_class_for(model_type)
    folder = cache_folder(path, tokenizer_class)
    hf = _read_cached(tokenizer_class, folder)
    if hf is None:
        hf = tokenizer_class.from_pretrained(str(path.parent), gguf_file=path.name)
        _write_cached(hf, folder)
    return Tokenizer(hf, chat_template=chat_template)


def cache_folder(path: Path, tokenizer_class) -> Path:
    """Where the tokenizer converted from this GGUF file is kept."""
    import tokenizers
    import transformers

    stat = path.stat()
    key = repr((str(path.resolve()), stat.st_size, stat.st_mtime_ns, tokenizer_class.__name__,
                transformers.__version__, tokenizers.__version__))
    root = os.environ.get("ONDO_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ondo"
    return Path(root) / "gguf-tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:32]


def _read_cached(tokenizer_class, folder: Path):
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        return tokenizer_class.from_pretrained(str(folder))
    except Exception as error:  # a damaged folder: convert again (and overwrite it)
        logger.debug("cached tokenizer %s unreadable (%s): converting the GGUF vocabulary again", folder, error)
        return None


def _write_cached(hf, folder: Path) -> None:
    """Saved into a temporary folder renamed into place, so a reader never sees half a tokenizer."""
    staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        hf.save_pretrained(str(staging))
        shutil.rmtree(folder, ignore_errors=True)   # a damaged one
        os.replace(staging, folder)
    except OSError as error:   # read-only home, full disk, a concurrent writer won: run without it
        logger.debug("tokenizer cache %s not written: %s", folder, error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
