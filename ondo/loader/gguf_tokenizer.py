"""The tokenizer embedded in a GGUF file.

transformers converts GGUF vocabulary metadata (tokens, merges or scores, token types, special
ids, the BOS rule, the chat template) into a fast tokenizer; ondo uses that conversion with the
tokenizer class `AutoTokenizer.from_pretrained(folder, gguf_file=...)` would pick for the model
type (GemmaTokenizer for Gemma, which also knows `<mask>`; Qwen2Tokenizer for Qwen; the generic
backend for Llama-family files), so ids and special tokens are exactly transformers'. Unlike
AutoTokenizer it does not first parse the whole file a second time to build a model config.
"""

from __future__ import annotations

import os
from pathlib import Path

from ondo.loader.gguf_config import GGUF_ARCHITECTURES
from ondo.loader.gguf_reader import read_architecture
from ondo.tokenizer.tokenizer import Tokenizer


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
    hf = tokenizer_class_for(model_type).from_pretrained(str(path.parent), gguf_file=path.name)
    return Tokenizer(hf, chat_template=chat_template)
