"""Token-budget scheduling, one rule for everything (as vLLM's v1).

Each request has `num_computed_tokens` and a target, `num_tokens` (prompt + output so far). Every step
hands out at most `max_num_batched_tokens` new tokens so that computed catches up with target:
prefill, chunked prefill, decode and prefix-cache hits are all that rule. Running requests are
served first; when the block pool runs dry the newest running request is preempted (its blocks
freed, its tokens kept) and recomputed later, so nothing is lost.

Async scheduling is the same rule with placeholders (as vLLM's v1): a token sampled on the device
but not yet read back counts as known (`Request.num_output_placeholders`), so step N+1 is scheduled
while step N's tokens are still in flight; the model runner takes such a token's id from the device.
A placeholder that would pass max_tokens is never scheduled, and a preempted request waits for its
placeholder to land before it is admitted again.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ondo.engine.block_manager import BlockManager
from ondo.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int      # tokens computed this step, starting at request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a new token is sampled
        (never for a score-only request, max_tokens=0, which ends with its prompt)."""
        return self.num_new_tokens == _num_remaining(self.request) and self.request.max_tokens > 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    preempted: list[Request]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, prefill_tokens_while_decoding: int | None = None):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        # Where a step's time grows with its tokens (the CPU), a long prompt would stall every
        # decoding request for its whole prefill: while some request decodes, decodes go first and
        # prompts get at most this many tokens per step. A prompt alone still gets the whole budget.
        self.prefill_tokens_while_decoding = prefill_tokens_while_decoding
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.lora_slots = None   # the LoRAManager when adapters are enabled: admission needs an adapter slot

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        order = list(self.running)
        if self.prefill_tokens_while_decoding is not None and self.enable_chunked_prefill:
            num_decoding = sum(1 for r in order if _num_remaining(r) == 1)
            if num_decoding:
                budget = min(budget, num_decoding + self.prefill_tokens_while_decoding)
                order.sort(key=lambda r: _num_remaining(r) > 1)   # decodes first, stable

        for request in order:
            if budget == 0 or request in preempted:
                continue
            if request.num_output_placeholders and request.num_output_tokens + request.num_output_placeholders >= request.max_tokens:
                continue   # its last token is in flight: nothing more to compute
            num_new = self._chunk(_num_remaining(request), budget)
            if num_new == 0:
                continue
            while not self.blocks.allocate(request, request.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                # Decodes go first (above), so the newest request may already be in this step: take it out.
                for item in scheduled:
                    if item.request is victim:
                        scheduled.remove(item)
                        budget += item.num_new_tokens
                        break
                if victim is request:
                    break
            if request in preempted:
                continue
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

        if not preempted:  # admit new work only when the running set is not short of blocks
            self._admit_waiting(scheduled, budget)
        return SchedulerOutput(scheduled, sum(s.num_new_tokens for s in scheduled), preempted)

    def _admit_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting.popleft()
            leader = request.prefill_leader
            if leader is not None and not leader.is_finished and leader.num_computed_tokens < leader.num_prompt_tokens:
                skipped.append(request)   # wait for the sibling's prompt blocks to share them
                continue
            if request.num_output_placeholders:
                skipped.append(request)   # preempted with a token in flight: admitted once it has landed
                continue
            if self.lora_slots is not None and not self.lora_slots.acquire(request):
                skipped.append(request)   # every adapter slot is held by running requests: wait for one
                continue
            if request.num_computed_tokens == 0 and not request.block_table:
                request.num_computed_tokens = self.blocks.match_prefix(request)
                request.num_cached_tokens = request.num_computed_tokens
            num_new = self._chunk(_num_remaining(request), budget)
            if num_new == 0 or not self.blocks.allocate(request, request.num_computed_tokens + num_new):
                # Let go of a matched prefix: waiting requests holding cached blocks could starve the pool.
                self.blocks.free(request)
                request.num_computed_tokens = request.num_cached_tokens = 0
                self.waiting.appendleft(request)
                break
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

    def _chunk(self, num_remaining: int, budget: int) -> int:
        if num_remaining <= budget:
            return num_remaining
        return budget if self.enable_chunked_prefill else 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.free(request)
        if self.lora_slots is not None:
            self.lora_slots.release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_after_step(self, output: SchedulerOutput) -> None:
        """The forward was launched: advance computed counts, count each token being sampled as a
        placeholder until it lands (`Engine.apply_sampled`), publish newly full blocks to the prefix cache."""
        for item in output.scheduled:
            request = item.request
            if item.samples:
                request.num_output_placeholders += 1
            request.num_computed_tokens += item.num_new_tokens
            self.blocks.cache_full_blocks(request)

    def unschedule_placeholder(self, request: Request) -> None:
        """Take back a launched step's row whose input was a placeholder that turned out unusable (the
        device left the token to the host's full sort): the row is neither sampled nor counted, and the
        next step computes that position again with the real token."""
        request.num_computed_tokens -= 1
        request.num_output_placeholders -= 1

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request and free its blocks."""
        request.status = RequestStatus.FINISHED
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.blocks.free(request)
        if self.lora_slots is not None:
            self.lora_slots.release(request)


def _num_remaining(request: Request) -> int:
    """Tokens to compute before the request is caught up, its placeholders included."""
    return request.num_tokens + request.num_output_placeholders - request.num_computed_tokens
