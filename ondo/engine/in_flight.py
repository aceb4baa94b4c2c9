"""Async scheduling: step N+1 is scheduled and launched while step N's tokens are on their way to the host.

A synchronous step leaves the device idle while the host waits for the sampled tokens, checks stops,
emits and schedules. With async scheduling one step loop (`Engine.core_step`) keeps the device one
step ahead, for every batch (prefill chunks, decodes, mixed), in four stages:

 1. launched: the scheduler's step goes to the model runner and its forward is queued on the device
    (`LaunchedStep`). The tokens it will sample count as placeholders in the scheduler
    (`Request.num_output_placeholders`).
 2. sampled, at the start of the next `core_step`: every earlier token is on the host by then, so
    the sampler sees what the synchronous path sees (grammar masks, n-gram and bad-word bans,
    penalties, min_tokens, seeded draws). The chosen ids stay on the device (`SampledStep`) and
    their host copy is queued behind them. A batch with log-probs is sampled on the host at once
    and its tokens applied, as the synchronous path does.
 3. the next step is scheduled and launched; its placeholders take their ids from the sampled
    tokens on the device (`InFlightTokens`).
 4. landed: the host reads the sampled tokens, checks their stops and emits them while the device
    runs stage 3's forward; a grammar's next masks start filling (`prefetch_bitmask`).

When nothing useful is queued (the first step, or after the engine went idle) a step is scheduled and
launched first, so every `core_step` hands back one step's tokens, as the synchronous engine does. A
request added meanwhile joins the step after the one already launched.

Nothing is guessed and nothing is discarded whole. A row of a request that finished meanwhile (EOS,
a stop string, an abort) is computed in stage 3 and never sampled; the K/V it wrote lands past the
request's tokens, in blocks the stream reuses only after it. A row the sampler's candidates could not
decide comes back -1 and is redone by the full sort when it lands (`Sampler.redo`); the row that
stage 3 launched on that placeholder is taken back (`Scheduler.unschedule_placeholder`) and computed
again by the next step. Nothing is drawn for a row that is taken back, so seeded requests stay
reproducible.

Without async scheduling (the CPU by default: there the device is the host) each step is sampled and
landed right after its launch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ondo.engine.model_runner import InFlightTokens, ModelRunnerOutput
from ondo.engine.request import Request
from ondo.engine.scheduler import SchedulerOutput
from ondo.sample.sampler import Sampler


@dataclass
class LaunchedStep:
    """A step whose forward is queued on the device and whose rows are not sampled yet."""
    schedule: SchedulerOutput
    result: ModelRunnerOutput
    taken_back: set[Request] = field(default_factory=set)   # rows computed on an unusable placeholder

    def has_running_rows(self) -> bool:
        return any(not item.request.is_finished and item.request not in self.taken_back
                   for item in self.schedule.scheduled)

    def rows_to_sample(self) -> list[int]:
        """Rows of `result.sample_logits` still to sample: their request is running and the row stands."""
        scheduled = self.schedule.scheduled
        return [row for row, index in enumerate(self.result.sample_indices)
                if not scheduled[index].request.is_finished and scheduled[index].request not in self.taken_back]


@dataclass
class SampledStep:
    """A step's tokens, chosen on the device; the host has not read them yet."""
    requests: list[Request]            # one per row
    token_ids: torch.Tensor            # [rows] int64 on the device; -1 = left to Sampler.redo
    host_token_ids: torch.Tensor       # [rows] int64 host copy, valid once `copied` has completed
    copied: torch.cuda.Event | None    # None when the device is the host
    processed: torch.Tensor | None     # [rows, vocab] the processed logits Sampler.redo needs; None if greedy

    def in_flight(self) -> InFlightTokens:
        tokens = self.token_ids if self.processed is None else self.token_ids.clamp(min=0)   # -1 rows: taken back
        return InFlightTokens(tokens, {request: row for row, request in enumerate(self.requests)})

    def read(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_token_ids.tolist()


def samples_on_device(request: Request) -> bool:
    """True when the request's token can stay on the device: nothing but the token is read back
    (no log-probs; best_of > n ranks by them)."""
    params = request.sampling_params
    return params.logprobs is None and params.best_of <= params.n and not request.wants_prompt_logprobs


def sample_on_device(sampler: Sampler, requests: list[Request], logits: torch.Tensor) -> SampledStep:
    """The sampler's choice for `requests`, left on the device with its host copy queued."""
    token_ids, processed = sampler.sample_on_device(logits, requests)   # [rows]
    if all(r.sampling_params.greedy for r in requests):
        processed = None   # greedy rows never need Sampler.redo
    elif processed.data_ptr() == logits.data_ptr():
        processed = processed.clone()   # a graph's output buffer: the next step's replay overwrites it
    if token_ids.device.type == "cpu":
        return SampledStep(requests, token_ids, token_ids, None, processed)
    host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
    host.copy_(token_ids, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return SampledStep(requests, token_ids, host, copied, processed)


def gather_rows(values: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """values[rows] ([rows, vocab] logits), a view when rows are a prefix."""
    if rows == list(range(len(rows))):
        return values[:len(rows)]
    return values[torch.tensor(rows, dtype=torch.long).to(values.device, non_blocking=True)]
