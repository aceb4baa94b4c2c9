"""What the sampler derives from a batch's SamplingParams, built once while the batch stays the same.

A decode batch is mostly the same requests step after step, and a SamplingParams is frozen, so the
values the sampler derives from its rows' options (candidate budgets, option columns copied to the
device, penalty values) are last step's whenever the same params objects come back in the same
order. At 256 rows building them costs a few tenths of a millisecond of host time a step, which a
small model's decode step cannot hide. One entry per name: the params are kept with it, so their
ids cannot be reused while it stands.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence, TypeVar

T = TypeVar("T")

_entries: dict[Hashable, tuple[tuple[int, ...], list, Any]] = {}


def derived(name: Hashable, params: Sequence[Any], build: Callable[[], T]) -> T:
    """`build()` for these params, or the value last built under `name` for the same params objects in
    the same order. `name` must hold whatever else the value depends on (vocabulary size, device);
    the value must not be changed in place by its users."""
    key = tuple(map(id, params))
    entry = _entries.get(name)
    if entry is not None and entry[0] == key:
        return entry[2]
    value = build()
    _entries[name] = (key, list(params), value)
    return value
