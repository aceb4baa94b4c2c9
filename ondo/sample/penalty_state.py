"""Per-request penalty state kept on the device and updated with each step's new tokens.

Repetition penalty needs, per request, which tokens occur in prompt + output; presence and
frequency penalties need how often each token occurs in the output. Rebuilding those `[rows, vocab]`
tensors from Python token lists every step costs more than the rest of the sampler (a list -> tensor
conversion of every history, a host -> device copy of it, a scatter over the whole history).
Here each request owns one row (a "slot") of two persistent device buffers:

- `seen`   [capacity, vocab] bool:    tokens in the prompt or the output (repetition_penalty)
- `counts` [capacity, vocab] float32: occurrences of each token in the output (presence/frequency)

A step uploads only the tokens appended since the previous step (one small host -> device copy for
the whole batch) and scatters them in; on CUDA the common step's one new token per row is added by
the penalty kernel itself, which reads the buffers at each row's slot (`slots`, penalties_triton.py),
so that step costs one upload of [rows] slots and tokens and no scatter or gather. The host list
stays the truth: a slot remembers how many output tokens it holds and the last of them, and a
request whose output no longer extends what the slot holds (the token was not appended, the output
was replaced) has its slot rebuilt from the lists. Slots are freed when their request is garbage-collected or found finished.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ondo.sample.logits_processors import device_scalar

# Room for this many requests at first; doubled when full.
INITIAL_CAPACITY = 16


@dataclass
class _Slot:
    index: int
    ref: weakref.ref | None
    counted: int = -1  # output tokens held in the buffers; -1 = never filled
    last_token: int = -1  # the last of them, to check cheaply that the output still extends it


@dataclass
class PenaltyRows:
    """The batch's penalty rows, ready to apply. seen / counts: [rows, vocab], or None when no row
    of the batch needs them."""
    seen: torch.Tensor | None
    counts: torch.Tensor | None


@dataclass
class PenaltySlots:
    """The batch's penalty state for a kernel that reads it by slot: seen / counts are the whole
    [capacity, vocab] buffers (None when no row needs them), slots [rows] each row's slot, new_tokens
    [rows] the token the kernel adds to the row's slot before applying it (-1: none)."""
    seen: torch.Tensor | None
    counts: torch.Tensor | None
    slots: torch.Tensor
    new_tokens: torch.Tensor


@dataclass
class _Pending:
    """What a step adds to the buffers: every row's slot and its one new token (-1: none), and the
    scatters of the rarer cases (a slot rebuilt from its prompt, several tokens at once)."""
    row_slots: list[int]
    new_tokens: list[int]
    identity: bool  # the rows are slots 0..rows-1 in order
    resets: list[int] = field(default_factory=list)
    seen_slots: list[int] = field(default_factory=list)
    seen_tokens: list[int] = field(default_factory=list)
    count_slots: list[int] = field(default_factory=list)
    count_tokens: list[int] = field(default_factory=list)

    def scatters(self, one_slots: list[int], one_tokens: list[int]) -> list[list[int]]:
        """resets, seen (slots, tokens), counted (slots, tokens), with the given one-token rows added."""
        return [self.resets, self.seen_slots + one_slots, self.seen_tokens + one_tokens,
                self.count_slots + one_slots, self.count_tokens + one_tokens]


class PenaltyState:
    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}
        self._free: list[int] = []
        self._transient: list[int] = []  # slots of requests that cannot be weakly referenced
        self._in_batch: set[int] = set()  # ids of the requests of the call under way
        self._last_batch: list = []  # the last call's requests (kept alive), their slots, and
        self._last_slots: list[_Slot] = []  # whether those were 0..rows-1 in order
        self._last_identity = False
        self._capacity = 0
        self._seen: torch.Tensor | None = None  # [capacity, vocab] bool
        self._counts: torch.Tensor | None = None  # [capacity, vocab] float32
        self._vocab_size = 0
        self._device: torch.device | None = None

    def rows(self, requests: Sequence[Any], vocab_size: int, device: torch.device,
             need_seen: bool, need_counts: bool) -> PenaltyRows:
        """Bring the slots of `requests` up to date with their token lists; return their rows."""
        pending = self._pending(requests, vocab_size, device, need_seen, need_counts)
        added = [i for i, token in enumerate(pending.new_tokens) if token >= 0]
        one_slots = [pending.row_slots[i] for i in added]
        one_tokens = [pending.new_tokens[i] for i in added]
        flat = self._upload(pending.scatters(one_slots, one_tokens) + [pending.row_slots])
        self._scatter(*flat[:5])
        if pending.identity:  # the batch holds slots 0..rows-1 in order: views, no gather
            pick = lambda buffer: buffer[:len(pending.row_slots)]  # noqa: E731
        else:
            pick = lambda buffer: buffer.index_select(0, flat[5])  # noqa: E731
        return PenaltyRows(pick(self._seen) if need_seen else None,
                           pick(self._counts) if need_counts else None)

    def slots(self, requests: Sequence[Any], vocab_size: int, device: torch.device,
              need_seen: bool, need_counts: bool) -> PenaltySlots:
        """As `rows`, for a kernel that reads the buffers at each row's slot and adds the row's one new
        token itself (penalties_triton.py): the common decode step then costs one small upload and no
        scatter. Call `forget(requests)` if that kernel does not run."""
        pending = self._pending(requests, vocab_size, device, need_seen, need_counts)
        lists = pending.scatters([], []) + [pending.row_slots, pending.new_tokens]
        if any(lists[:5]):
            flat = self._upload(lists)
            self._scatter(*flat[:5])
            row_slots, new_tokens = flat[5], flat[6]
        else:  # the common step: no reset and no earlier token to add, no split
            rows = len(pending.row_slots)
            flat = torch.tensor(lists[5] + lists[6], dtype=torch.long).to(self._device, non_blocking=True)
            row_slots, new_tokens = flat[:rows], flat[rows:]
        return PenaltySlots(self._seen if need_seen else None, self._counts if need_counts else None,
                            row_slots, new_tokens)

    def forget(self, requests: Sequence[Any]) -> None:
        """The tokens `slots` left to the kernel were not added: rebuild these requests' slots."""
        for request in requests:
            slot = self._slots.get(id(request))
            if slot is not None:
                slot.counted = -1

    def _pending(self, requests: Sequence[Any], vocab_size: int, device: torch.device,
                 need_seen: bool, need_counts: bool) -> _Pending:
        """What the buffers lack for `requests`, the host lists being the truth; the slots count it as
        added from here on."""
        self._ensure_buffers(vocab_size, device, need_seen, need_counts)
        slots, identity = self._batch_slots(requests)
        pending = _Pending([s.index for s in slots], [-1] * len(slots), identity)
        for row, (request, slot) in enumerate(zip(requests, slots)):
            output = request.output_token_ids
            length = len(output)
            counted = slot.counted
            if counted == length - 1 and counted >= 0 and (not counted or output[counted - 1] == slot.last_token):
                # the common step: one token appended since the last one, seen and counted alike
                token = output[counted]
                pending.new_tokens[row] = token
                slot.counted, slot.last_token = length, token
                continue
            if counted < 0 or counted > length or (counted and output[counted - 1] != slot.last_token):
                pending.resets.append(slot.index)
                prompt = request.prompt_token_ids
                pending.seen_slots += [slot.index] * len(prompt)
                pending.seen_tokens += prompt
                slot.counted = 0
            new = output[slot.counted:] if slot.counted < length else ()
            if new:
                pending.seen_slots += [slot.index] * len(new)
                pending.seen_tokens += new
                pending.count_slots += [slot.index] * len(new)
                pending.count_tokens += new
            slot.counted = length
            slot.last_token = output[-1] if length else -1
        self._free += self._transient
        self._transient = []
        return pending

    def _batch_slots(self, requests: Sequence[Any]) -> tuple[list[_Slot], bool]:
        """Each request's slot, and whether they are slots 0..rows-1 in order. A decode batch is mostly
        the same requests step after step: then the last step's answer stands (it holds those
        requests, so none of their slots was freed meanwhile)."""
        last = self._last_batch
        if len(last) == len(requests) and all(map(operator.is_, last, requests)):
            return self._last_slots, self._last_identity
        self._in_batch = {id(r) for r in requests}  # never freed while the batch uses them
        slots = [self._slot(r) for r in requests]
        identity = all(slot.index == i for i, slot in enumerate(slots))
        # A transient slot is freed after this call: such a batch is not kept.
        self._last_batch = list(requests) if not self._transient else []
        self._last_slots, self._last_identity = slots, identity
        return slots, identity

    def _upload(self, lists: list[list[int]]) -> list[torch.Tensor]:
        """One host -> device copy for the whole step, split back into the lists."""
        flat = torch.tensor([v for values in lists for v in values], dtype=torch.long)
        return list(flat.to(self._device, non_blocking=True).split([len(values) for values in lists]))

    def _scatter(self, resets, seen_slots, seen_tokens, count_slots, count_tokens) -> None:
        if len(resets):
            for buffer in (self._seen, self._counts):
                if buffer is not None:
                    buffer.index_fill_(0, resets, 0)
        if len(seen_slots) and self._seen is not None:
            self._seen.index_put_((seen_slots, seen_tokens), device_scalar(True, torch.bool, self._device))
        if len(count_slots) and self._counts is not None:
            self._counts.index_put_((count_slots, count_tokens), device_scalar(1.0, torch.float32, self._device),
                                    accumulate=True)

    # ---- slots ---------------------------------------------------------------------------------

    def _slot(self, request: Any) -> _Slot:
        key = id(request)
        slot = self._slots.get(key)
        if slot is not None and (slot.ref is None or slot.ref() is request):
            return slot
        if slot is not None:  # a dead request's id reused before its callback ran
            self._release(key)
        index = self._take_index()
        try:
            ref = weakref.ref(request, lambda _: self._release(key))
        except TypeError:  # not weak-referenceable: rebuilt from its lists every step
            ref = None
        slot = _Slot(index, ref)
        if ref is not None:
            self._slots[key] = slot
        else:
            self._transient.append(index)  # this step only: freed once the rows are picked
        return slot

    def _take_index(self) -> int:
        if not self._free:
            self._release_finished()
        if not self._free:
            self._grow(max(INITIAL_CAPACITY, 2 * self._capacity))
        return self._free.pop()

    def _release(self, key: int) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._free.append(slot.index)

    def _release_finished(self) -> None:
        """Requests live on in reference cycles until the cyclic collector runs: free the slots of
        those already finished (they never sample again) rather than grow."""
        for key, slot in list(self._slots.items()):
            request = slot.ref() if slot.ref is not None else None
            if key in self._in_batch and request is not None:
                continue
            if request is None or getattr(request, "is_finished", False):
                self._release(key)

    def _grow(self, capacity: int) -> None:
        def grown(buffer: torch.Tensor | None) -> torch.Tensor | None:
            if buffer is None:
                return None
            bigger = torch.zeros(capacity, self._vocab_size, dtype=buffer.dtype, device=self._device)
            bigger[:self._capacity] = buffer
            return bigger

        self._seen, self._counts = grown(self._seen), grown(self._counts)
        # Lowest index popped first, so a steady batch keeps slots 0..rows-1 (the no-gather case).
        self._free = sorted(set(self._free) | set(range(self._capacity, capacity)), reverse=True)
        self._capacity = capacity

    def _ensure_buffers(self, vocab_size: int, device: torch.device, need_seen: bool,
                        need_counts: bool) -> None:
        if self._device is not None and (vocab_size != self._vocab_size or device != self._device):
            self.__init__()  # another model or device: start over
        self._vocab_size, self._device = vocab_size, device
        if self._capacity == 0:
            self._grow(INITIAL_CAPACITY)
        if need_seen and self._seen is None:
            self._seen = torch.zeros(self._capacity, vocab_size, dtype=torch.bool, device=device)
            self._forget_all()
        if need_counts and self._counts is None:
            self._counts = torch.zeros(self._capacity, vocab_size, dtype=torch.float32, device=device)
            self._forget_all()

    def _forget_all(self) -> None:
        """A buffer just created holds nothing: every slot is rebuilt on its next use."""
        for slot in self._slots.values():
            slot.counted = -1

