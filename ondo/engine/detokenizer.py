"""Incremental detokenization: turn a growing list of output token ids into streamable text.

Byte-level BPE and byte-fallback vocabularies split one character (a Korean syllable, an emoji)
over several tokens; decoding a partial character yields U+FFFD. Text is therefore released only
once it is final: each step decodes a small window `ids[prefix_offset:]` and compares it with the
already-released part `ids[prefix_offset:read_offset]`; the difference is new text unless it ends
in U+FFFD, in which case it is held back until the character completes. The window restarts at
every release, so the work per token is O(1) rather than a re-decode of the whole output.

Decoding the window from `prefix_offset` (not from the single new token) keeps the context that
decoders need: SentencePiece's word-boundary spaces and byte-fallback sequences span tokens.
"""

from __future__ import annotations

from ondo.tokenizer.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of one request's output tokens, never emitting a broken character."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        # The prompt is kept for reference only: the output text must equal decode(output ids),
        # so the window never reaches into the prompt.
        self.prompt_len = len(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # window start: released tokens kept as decoding context
        self.read_offset = 0  # tokens before this are released as text
        self._prefix_text = ""  # decode(token_ids[prefix_offset:read_offset])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def push(self, token_ids: list[int]) -> str:
        """Append new output tokens; return the text that became final (possibly "")."""
        if not token_ids:
            return ""
        self.token_ids.extend(token_ids)
        window_text = self._decode(self.token_ids[self.prefix_offset :])
        if window_text.endswith(_REPLACEMENT_CHAR) or len(window_text) <= len(self._prefix_text):
            # A character is still incomplete (or the new tokens decode to nothing yet, like a
            # skipped special token or a lone byte-fallback piece): hold back.
            return ""
        # Released text is never revised: the stream stays append-only even if a decoder rule
        # that looks ahead would rewrite the window's start.
        delta = window_text[len(self._prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self._prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of the request: release whatever was held back.

        Decodes the whole output once so the streamed text ends exactly equal to it; only if the
        stream diverged (a decoder rule that depends on far context) is the window tail used.
        """
        if not self.token_ids:
            return ""
        full_text = self._decode(self.token_ids)
        if full_text.startswith(self.text):
            delta = full_text[len(self.text) :]
        else:
            window_text = self._decode(self.token_ids[self.prefix_offset :])
            delta = window_text[len(self._prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self._prefix_text = ""
        self.text += delta
        return delta
