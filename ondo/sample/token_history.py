"""Host tensors of each request's prompt and output tokens, kept between steps.

Penalties, no_repeat_ngram and bad words read whole token histories. Converting a Python list of
thousands of ids to a tensor every step costs more than the GPU work (about 50 ms per step for
256 requests of 1,200 tokens), so the history of a request is converted once and then only its
new output tokens are appended. Entries are keyed by the request object and dropped when it is
garbage-collected.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Entry:
    ref: weakref.ref | None
    prompt: torch.Tensor  # [prompt_len] int64
    output: torch.Tensor  # [capacity] int64; the first `length` hold output tokens
    length: int
    last_token: int  # output[length - 1] as a Python int, to check cheaply that it still holds


class TokenHistory:
    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}

    def prompt(self, request: Any) -> torch.Tensor:
        """[prompt_len] int64 on the host."""
        return self._entry(request).prompt

    def output(self, request: Any) -> torch.Tensor:
        """[num_output_tokens] int64 on the host."""
        entry = self._entry(request)
        return entry.output[:entry.length]

    def full(self, request: Any) -> torch.Tensor:
        """Prompt then output, [prompt_len + num_output_tokens] int64 on the host."""
        entry = self._entry(request)
        return torch.cat([entry.prompt, entry.output[:entry.length]])

    def tail(self, request: Any, count: int) -> torch.Tensor:
        """The newest `count` tokens of prompt + output (fewer if the sequence is shorter)."""
        entry = self._entry(request)
        if entry.length >= count:
            return entry.output[entry.length - count:entry.length]
        missing = count - entry.length
        return torch.cat([entry.prompt[-missing:], entry.output[:entry.length]])

    def _entry(self, request: Any) -> _Entry:
        key = id(request)
        entry = self._entries.get(key)
        prompt_ids, output_ids = request.prompt_token_ids, request.output_token_ids
        if (entry is None or entry.ref is None or entry.ref() is not request
                or len(prompt_ids) != len(entry.prompt)):
            entry = self._new_entry(request)
        if not _still_a_prefix(entry, output_ids):
            entry.length = 0  # the output was replaced rather than extended: convert it again
        new = output_ids[entry.length:]
        if new:
            if entry.length + len(new) > len(entry.output):
                grown = torch.empty(max(2 * len(entry.output), entry.length + len(new)),
                                    dtype=torch.long)
                grown[:entry.length] = entry.output[:entry.length]
                entry.output = grown
            entry.output[entry.length:entry.length + len(new)] = torch.as_tensor(
                list(new), dtype=torch.long)
            entry.length += len(new)
            entry.last_token = int(new[-1])
        return entry

    def _new_entry(self, request: Any) -> _Entry:
        key = id(request)
        try:
            ref = weakref.ref(request, lambda _: self._entries.pop(key, None))
        except TypeError:  # not weak-referenceable: convert every step, never cache
            ref = None
        entry = _Entry(ref, torch.as_tensor(list(request.prompt_token_ids), dtype=torch.long),
                       torch.empty(64, dtype=torch.long), 0, -1)
        if ref is not None:
            self._entries[key] = entry
        return entry


def _still_a_prefix(entry: _Entry, output_ids: Any) -> bool:
    """Cheap check that the cached tokens are still the start of the output: same or greater
    length and the same last cached token (outputs only ever grow at the end)."""
    if entry.length == 0:
        return True
    return (len(output_ids) >= entry.length
            and entry.last_token == output_ids[entry.length - 1])
