"""The tokenizer ondo runs with: a thin, uniform wrapper over a Hugging Face tokenizer.

`load_tokenizer` accepts a Hugging Face model folder (tokenizer.json / tokenizer_config.json /
vocabulary files) or a `.gguf` file, whose embedded vocabulary is converted to a fast tokenizer.
Everything the engine needs -- special ids, the tokens that end a chat turn, encode/decode and
chat templating -- is exposed on `Tokenizer` so the rest of ondo never branches on the source.

A GGUF file's tokenizer, once converted and cached, loads without transformers (`PlainTokenizer`:
the `tokenizers` pipeline it comes down to, its special tokens, and chat templates rendered by
`jinja_chat.py`), saving the process some 30 MB; `Tokenizer.hf` still loads the transformers
tokenizer where one is needed (structured output's token table).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ondo.tokenizer.chat_template import (
    ChatTemplateError,
    render_chat_template,
    resolve_chat_template,
)

# Tokens with which common chat templates close a turn. A model that emits one of them has
# finished its answer even when its configured EOS is a different token.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML: Qwen, SmolLM
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3 tool calls
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi 3
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
)


class TokenizerLoadError(ValueError):
    """The tokenizer files of a model folder are missing or unreadable."""


class PlainTokenizer:
    """A converted tokenizer without transformers: its `tokenizers` pipeline (encode and decode are that
    pipeline's, as transformers' fast tokenizer calls it when it adds nothing: `gguf_tokenizer` checks
    this before saving one), its special tokens, and a way back to transformers' own (`load_hf`)."""

    def __init__(self, backend, *, vocab_size: int, bos_token_id: int | None, eos_token_id: int | None,
                 all_special_ids: list[int], special_tokens: dict[str, Any], chat_template: str | None, load_hf):
        self.backend = backend                        # tokenizers.Tokenizer
        self.vocab_size, self.bos_token_id, self.eos_token_id = vocab_size, bos_token_id, eos_token_id
        self.all_special_ids = frozenset(all_special_ids)
        self.special_tokens = special_tokens          # bos_token, eos_token, ...: variables of chat templates
        self.chat_template = chat_template
        self.load_hf = load_hf

    def render(self, conversation: list[dict[str, Any]], template: str, **options: Any) -> str:
        from ondo.tokenizer import jinja_chat

        return jinja_chat.render(template, conversation, special_tokens=self.special_tokens, **options)


class Tokenizer:
    """A loaded tokenizer plus the chat template and stop tokens the model uses: a transformers tokenizer
    (`hf`), or a `PlainTokenizer` that loads one only when asked for `hf`."""

    def __init__(
        self,
        hf: Any = None,
        *,
        chat_template: str | None = None,
        extra_eos_token_ids: list[int] | tuple[int, ...] = (),
        plain: PlainTokenizer | None = None,
    ) -> None:
        if (hf is None) == (plain is None):
            raise ValueError("a Tokenizer wraps either a transformers tokenizer or a PlainTokenizer")
        self._hf, self.plain = hf, plain
        source = plain or hf
        self.vocab_size: int = plain.vocab_size if plain else len(hf)
        self.bos_token_id: int | None = source.bos_token_id
        self.eos_token_id: int | None = source.eos_token_id
        own_template = plain.chat_template if plain else _hf_template(hf)
        self.chat_template: str | None = chat_template if chat_template is not None else own_template
        self.all_special_ids: frozenset[int] = frozenset(source.all_special_ids)
        self.end_of_turn_token_ids: frozenset[int] = self._find_end_of_turn_ids(extra_eos_token_ids)
        self._backend_decode = plain.backend.decode if plain else _plain_backend_decode(hf)

    @property
    def hf(self):
        """The transformers tokenizer (loaded on first use where this one was loaded without it)."""
        if self._hf is None:
            self._hf = self.plain.load_hf()
        return self._hf

    def _find_end_of_turn_ids(self, extra_eos_token_ids) -> frozenset[int]:
        ids = {i for i in extra_eos_token_ids if 0 <= i < self.vocab_size}
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        # Only tokens the template really closes turns with: a base model's "</s>" is already
        # its EOS, and an unrelated special token must not stop generation.
        template = self.chat_template or ""
        candidates = [token for token in _END_OF_TURN_TOKENS if token in template]
        if candidates and self.plain is not None:
            found = (self.plain.backend.token_to_id(token) for token in candidates)
            ids.update(i for i in found if i is not None)
        elif candidates:
            vocab = self.hf.get_vocab()  # ~0.5 s for a 256k vocabulary: only when needed
            ids.update(vocab[token] for token in candidates if token in vocab)
        return frozenset(ids)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.plain is not None:
            ids = self.plain.backend.encode(text, add_special_tokens=add_special_tokens).ids
        else:
            ids = list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        # A prompt rendered by a chat template often starts with the BOS text already; the
        # tokenizer then adds a second BOS, which degrades many models. Keep exactly one.
        bos = self.bos_token_id
        if add_special_tokens and bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids

    def decode(
        self,
        ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        if not spaces_between_special_tokens and not skip_special_tokens:
            # Fast tokenizers have no such switch: join the pieces between special tokens.
            return _decode_without_special_spaces(self, ids)
        if self._backend_decode is not None:   # what hf.decode returns, without its Python layers
            return self._backend_decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The conversation rendered by the model's chat template, as text."""
        if self.chat_template is None:
            raise ChatTemplateError(
                "this model has no chat template: use a raw text prompt (generate) or pass "
                "--chat-template / chat_template=<jinja string or file>"
            )
        # transformers turns tool functions into JSON schemas; ondo's own rendering takes the schemas
        plain = self.plain is not None and all(isinstance(tool, dict) for tool in tools or ())
        return render_chat_template(
            self.plain.render if plain else self.hf,
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            **template_kwargs,
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """The conversation rendered by the chat template, as prompt token ids."""
        text = self.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            **template_kwargs,
        )
        # The template writes BOS itself where the model wants one (as transformers assumes).
        return self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_id}, "
            f"end_of_turn={sorted(self.end_of_turn_token_ids)}, chat_template={self.chat_template is not None})"
        )


def _hf_template(hf) -> str | None:
    template = getattr(hf, "chat_template", None)
    if isinstance(template, dict):
        # Several named templates: the "default" one is what a plain chat uses.
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def _decode_without_special_spaces(tokenizer: Tokenizer, ids: list[int]) -> str:
    special = tokenizer.all_special_ids
    pieces: list[str] = []
    run: list[int] = []
    for token_id in ids:
        if token_id in special:
            if run:
                pieces.append(tokenizer.decode(run, skip_special_tokens=False))
                run = []
            pieces.append(_token_text(tokenizer, token_id))
        else:
            run.append(token_id)
    if run:
        pieces.append(tokenizer.decode(run, skip_special_tokens=False))
    return "".join(pieces)


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    if tokenizer.plain is not None:
        return tokenizer.plain.backend.id_to_token(token_id)
    return tokenizer.hf.convert_ids_to_tokens(token_id)


def _generation_config_eos_ids(folder: Path) -> list[int]:
    """EOS ids listed in generation_config.json (Llama 3 lists several)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        return []  # the model loader reports a malformed generation_config.json
    if eos is None:
        return []
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


def load_tokenizer(source: str | os.PathLike, *, chat_template: str | None = None) -> Tokenizer:
    """Load the tokenizer of a Hugging Face model folder or a GGUF file.

    `chat_template` (a jinja string or the path of a file holding one) replaces the model's own.
    """
    path = Path(source)
    override = resolve_chat_template(chat_template)
    if path.is_file() and path.suffix == ".gguf":
        from ondo.loader.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path, chat_template=override)
    if path.is_file():  # tokenizer.json / tokenizer_config.json: its folder holds the rest
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer source must be a model folder or a .gguf file, got {str(source)!r}")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise TokenizerLoadError(f"cannot load a tokenizer from {str(path)!r}: {error}") from error
    return Tokenizer(hf, chat_template=override, extra_eos_token_ids=_generation_config_eos_ids(path))


def _plain_backend_decode(hf):
    """The `tokenizers` decode that `hf.decode` comes down to, when it adds nothing to it: a fast
    tokenizer whose class keeps transformers' own decode and that cleans up no spaces. Detokenizing
    calls decode twice per generated token; this skips about 2 us of Python wrapping per call."""
    from transformers import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    backend = getattr(hf, "_tokenizer", None)
    if (backend is None or not isinstance(hf, TokenizersBackend)
            or type(hf).decode is not PreTrainedTokenizerBase.decode
            or type(hf)._decode is not TokenizersBackend._decode
            or getattr(hf, "clean_up_tokenization_spaces", False)):
        return None
    return backend.decode
