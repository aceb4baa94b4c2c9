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

Later loads read it without transformers (`PlainTokenizer`: the `tokenizers` pipeline, the special
tokens, and `jinja_chat.py` for the chat template) where the folder holds `ondo-plain-tokenizer.json`.
That description is written with the folder only when the plain form gives transformers' results on
probe texts (special tokens among them: ids with and without special tokens, texts decoded with and
without them) and probe conversations (prompts, or the same error); a tokenizer class with a decode
of its own never gets one.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

from ondo.loader.gguf_config import GGUF_ARCHITECTURES
from ondo.loader.gguf_reader import GGUFFile
from ondo.tokenizer.tokenizer import PlainTokenizer, Tokenizer

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
    folder = cache_folder(metadata_digest, model_type)
    plain = _read_plain(folder)
    if plain is not None:
        return Tokenizer(plain=plain, chat_template=chat_template)
    tokenizer_class = tokenizer_class_for(model_type)
    hf = _read_cached(tokenizer_class, folder)
    if hf is None:
        hf = tokenizer_class.from_pretrained(str(path.parent), gguf_file=path.name)
        _write_cached(hf, folder)
    return Tokenizer(hf, chat_template=chat_template)


def cache_folder(metadata_digest: str, model_type: str | None) -> Path:
    """Where the tokenizer converted from a GGUF file with this metadata is kept (the versions read
    from the installed packages' metadata: importing transformers is what a cached load avoids)."""
    key = repr((metadata_digest, model_type, _version("transformers"), _version("tokenizers")))
    return cache_root() / "gguf-tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:32]


def cache_root() -> Path:
    """Where ondo keeps what it derives from model files: `$ONDO_CACHE_DIR`, default `~/.cache/ondo`."""
    root = os.environ.get("ONDO_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ondo"
    return Path(root)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_cached(tokenizer_class, folder: Path):
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        return tokenizer_class.from_pretrained(str(folder))
    except Exception as error:  # a damaged folder: convert again (and overwrite it)
        logger.debug("cached tokenizer %s unreadable (%s): converting the GGUF vocabulary again", folder, error)
        return None


def _read_plain(folder: Path) -> PlainTokenizer | None:
    """The cached tokenizer without transformers, where the folder says it gives transformers' results."""
    try:
        described = json.loads((folder / _PLAIN_FILE).read_text())
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(str(folder / "tokenizer.json"))
    except FileNotFoundError:
        return None
    except Exception as error:   # damaged: the transformers tokenizer serves (and the folder is rewritten)
        logger.debug("plain tokenizer of %s unreadable (%s)", folder, error)
        return None
    class_name = described.pop("tokenizer_class")
    return PlainTokenizer(backend, **described, load_hf=functools.partial(_load_hf, class_name, str(folder)))


def _load_hf(class_name: str, folder: str):
    """The transformers tokenizer of a cache folder (a module-level function: a Tokenizer pickles)."""
    import transformers

    return getattr(transformers, class_name).from_pretrained(folder)


def _write_cached(hf, folder: Path) -> None:
    """Saved into a temporary folder renamed into place, so a reader never sees half a tokenizer; kept
    only when reading it back gives the same tokenizer (a class may rebuild its pipeline from the
    vocabulary when loaded from a folder, e.g. GemmaTokenizer over a byte-level vocabulary). The
    description of its plain form (`_PLAIN_FILE`) is added only where that form gives transformers'
    ids, texts and prompts (`_plain_matches`)."""
    staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        hf.save_pretrained(str(staging))
        if _same_tokenizer(hf, type(hf).from_pretrained(str(staging))):
            _describe_plain(hf, staging)
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


_PLAIN_FILE = "ondo-plain-tokenizer.json"


def _describe_plain(hf, folder: Path) -> None:
    from ondo.tokenizer.tokenizer import _hf_template, _plain_backend_decode

    template = _hf_template(hf)
    if _plain_backend_decode(hf) is None or (hf.chat_template is not None and not isinstance(hf.chat_template, str)):
        return                            # a decode of its own, or several named templates: transformers serves
    described = {"tokenizer_class": type(hf).__name__, "vocab_size": len(hf), "bos_token_id": hf.bos_token_id,
                 "eos_token_id": hf.eos_token_id, "all_special_ids": list(hf.all_special_ids),
                 "special_tokens": dict(hf.special_tokens_map), "chat_template": template}
    json.dumps(described)                 # only plain values (raises otherwise: not cached)
    from tokenizers import Tokenizer as Backend

    plain = PlainTokenizer(Backend.from_file(str(folder / "tokenizer.json")), load_hf=None,
                           **{k: v for k, v in described.items() if k != "tokenizer_class"})
    if _plain_matches(hf, plain):
        (folder / _PLAIN_FILE).write_text(json.dumps(described))
    else:
        logger.debug("the plain form of tokenizer %s differs from transformers': not described", folder)


_PROBE_TEXTS = ["", "Hello, world!", " leading and trailing spaces  ", "multi\nline\n\n\ttext",
                "unicode: 안녕하세요, café, naïve, 日本語 🤖", "digits 1234567890 3.14159 -42", "<html> & 'quotes' \"x\""]
_PROBE_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "안녕하세요?"}],
]


def _plain_matches(hf, plain: PlainTokenizer) -> bool:
    """Whether `plain` encodes, decodes and renders the probes (special tokens among them) as `hf` does."""
    from ondo.tokenizer.chat_template import ChatTemplateError, render_chat_template

    specials = [hf.convert_ids_to_tokens(i) for i in sorted(hf.all_special_ids)]
    texts = _PROBE_TEXTS + ["".join(specials) + " between " + " ".join(specials)]
    for text in texts:
        for special in (True, False):
            ids = list(hf.encode(text, add_special_tokens=special))
            if plain.backend.encode(text, add_special_tokens=special).ids != ids:
                return False
            for skip in (True, False):
                if plain.backend.decode(ids, skip_special_tokens=skip) != hf.decode(ids, skip_special_tokens=skip):
                    return False
    if plain.chat_template is None:
        return True

    def rendered(apply, chat, **options):
        try:
            return render_chat_template(apply, plain.chat_template, chat, **options)
        except ChatTemplateError as error:
            return ("error", str(error))

    cases = [(chat, dict(add_generation_prompt=g)) for chat in _PROBE_CHATS for g in (True, False)]
    cases.append((_PROBE_CHATS[1][:3], dict(continue_final_message=True)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a template without a system role warns, both ways
        return all(rendered(plain.render, chat, **o) == rendered(hf, chat, **o) for chat, o in cases)
