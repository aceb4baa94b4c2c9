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
SHA-256 of the file's metadata (every key/value, the vocabulary included: a few milliseconds) and by
the transformers and tokenizers versions, and later loads read that folder (~0.12 s). A cache that
cannot be written or read is skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from ondo.loader.gguf_config import GGUF_ARCHITECTURES
from ondo.loader.gguf_reader import GGUFFile
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
    path: str | os.PathLike, *, chat_template: str | None = None, model_type: str | None = None,
    metadata_digest: str | None = None,
) -> Tokenizer:
    """The tokenizer of a GGUF file.

    `chat_template` (jinja text) replaces the file's `tokenizer.chat_template`; `model_type` (the HF
    model type) and `metadata_digest` (`GGUFFile.metadata_digest`), when the caller has opened the
    file already, save reading its metadata again.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if model_type is None or metadata_digest is None:
        gguf = GGUFFile(path, metadata_only=True)
        model_type = model_type or GGUF_ARCHITECTURES.get(gguf.architecture, (None,))[0]
        metadata_digest = gguf.metadata_digest()
    tokenizer_class = tokenizer_class_for(model_type)
    folder = cache_folder(metadata_digest, tokenizer_class)
    hf = _read_cached(tokenizer_class, folder)
    if hf is None:
        hf = tokenizer_class.from_pretrained(str(path.parent), gguf_file=path.name)
        _write_cached(hf, folder)
    return Tokenizer(hf, chat_template=chat_template)


def cache_folder(metadata_digest: str, tokenizer_class) -> Path:
    """Where the tokenizer converted from a GGUF file with this metadata is kept."""
    import tokenizers
    import transformers

    key = repr((metadata_digest, tokenizer_class.__name__, transformers.__version__, tokenizers.__version__))
    return cache_root() / "gguf-tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:32]


def cache_root() -> Path:
    """Where ondo keeps what it derives from model files: `$ONDO_CACHE_DIR`, default `~/.cache/ondo`."""
    root = os.environ.get("ONDO_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ondo"
    return Path(root)


def _read_cached(tokenizer_class, folder: Path):
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        return tokenizer_class.from_pretrained(str(folder))
    except Exception as error:  # a damaged folder: convert again (and overwrite it)
        logger.debug("cached tokenizer %s unreadable (%s): converting the GGUF vocabulary again", folder, error)
        return None


def _write_cached(hf, folder: Path) -> None:
    """Saved into a temporary folder renamed into place, so a reader never sees half a tokenizer; kept
    only when reading it back gives the same tokenizer (a class may rebuild its pipeline from the
    vocabulary when loaded from a folder, e.g. GemmaTokenizer over a byte-level vocabulary)."""
    staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        hf.save_pretrained(str(staging))
        if _same_tokenizer(hf, type(hf).from_pretrained(str(staging))):
            shutil.rmtree(folder, ignore_errors=True)   # a damaged one
            os.replace(staging, folder)
        else:
            logger.debug("tokenizer of %s does not survive save_pretrained: not cached", folder)
    except Exception as error:   # read-only home, full disk, a concurrent writer won, a folder that
        logger.debug("tokenizer cache %s not written: %s", folder, error)   # does not load: run without it
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _same_tokenizer(a, b) -> bool:
    return (a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str() and len(a) == len(b)
            and a.all_special_ids == b.all_special_ids and a.chat_template == b.chat_template
            and (a.bos_token_id, a.eos_token_id) == (b.bos_token_id, b.eos_token_id))
