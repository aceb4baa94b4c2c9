"""Tokenizers (Hugging Face folders and GGUF files) and chat templates."""
from ondo.tokenizer.chat_template import ChatTemplateError
from ondo.tokenizer.tokenizer import Tokenizer, TokenizerLoadError, load_tokenizer

__all__ = ["ChatTemplateError", "Tokenizer", "TokenizerLoadError", "load_tokenizer"]
