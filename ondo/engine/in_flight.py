"""Async scheduling: step N+1 is scheduled and launched while step N's tokens are on their way to the host.

A synchronous step leaves the device idle while the host waits for the sampled tokens, checks stops,
emits and schedules. With async scheduling one step loop (`Engine.core_step`) keeps the device one
step ahead, for every batch (prefill chunks, decodes, mixed), in four stages:

 1. launched: the scheduler's step goes to the model runner and its forward is queued on the device
    (`LaunchedStep`). The tokens it will sample count as placeholders in the scheduler
    (`Request.num_output_placeholders`).
 2. sampled, at the start of the next `core_step`: every earlier token is on the host by then, so
    the sampler sees what the synchronous path sees (grammar masks, n-gram and bad-word bans,
    penalties, min_tokens, seeded draws). The chosen ids (and the log-probs asked for) stay on the
    device (`SampledStep`) and their host copy is queued behind them.
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
from ondo.sample.sampler import DeviceSample, Sampler, SamplerOutput, host_output


@dataclass
class LaunchedStep:
    """A step whose forward is queued on the device and whose rows are not sampled yet."""
    schedule: SchedulerOutput
    result: ModelRunnerOutput
    taken_back: set[Request] = field(default_factory=set)   # rows computed on an unusable placeholder
    _sampled: list[Request] | None = field(default=None, init=False, repr=False)   # sampled_requests(), built once

    def stands(self, request: Request) -> bool:
        """The request's row still counts: the request runs on and its row was not taken back."""
        return not request.is_finished and request not in self.taken_back

    def has_running_rows(self) -> bool:
        return any(self.stands(item.request) for item in self.schedule.scheduled)

    def rows_to_sample(self) -> list[int]:
        """Rows of `result.sample_logits` still to sample."""
        return [row for row, request in enumerate(self.sampled_requests()) if self.stands(request)]

    def sampled_requests(self) -> list[Request]:
        """The request of each row of `result.sample_logits` (one list per step, asked for up to three
        times: callers only read it)."""
        if self._sampled is None:
            scheduled = self.schedule.scheduled
            self._sampled = [scheduled[index].request for index in self.result.sample_indices]
        return self._sampled


@dataclass
class SampledStep:
    """A step's tokens (and log-probs), chosen on the device; the host has not read them yet."""
    requests: list[Request]            # one per row
    sample: DeviceSample               # processed None when every row is greedy (never redone)
    host: torch.Tensor                 # host copy of the token ids, or of the log-prob columns (token first)
    copied: torch.cuda.Event | None    # None when the device is the host

    def in_flight(self) -> InFlightTokens:
        # A -1 row's placeholder is taken back when it lands; the model runner reads it as token 0.
        return InFlightTokens(self.sample.token_ids, {request: row for row, request in enumerate(self.requests)})

    def read(self) -> SamplerOutput:
        if self.copied is not None:
            self.copied.synchronize()
        return host_output(self.host.tolist(), self.requests, self.sample.logprobs)


def sample_on_device(sampler: Sampler, requests: list[Request], logits: torch.Tensor) -> SampledStep:
    """The sampler's choice for `requests`, left on the device with its host copy queued."""
    sample = sampler.sample_on_device(logits, requests)
    if all(r.sampling_params.greedy for r in requests):
        sample.processed = None   # greedy rows never need Sampler.redo
    elif sample.processed.data_ptr() == logits.data_ptr():
        sample.processed = sample.processed.clone()   # a graph's output buffer: the next replay overwrites it
    wanted = sample.to_read()
    if wanted.device.type == "cpu":
        return SampledStep(requests, sample, wanted, None)
    host = torch.empty(wanted.shape, dtype=wanted.dtype, pin_memory=True)
    host.copy_(wanted, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return SampledStep(requests, sample, host, copied)


def gather_rows(values: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """values[rows] ([rows, vocab] logits), a view when rows are a prefix."""
    if rows == list(range(len(rows))):
        return values[:len(rows)]
    return values[torch.tensor(rows, dtype=torch.long).to(values.device, non_blocking=True)]
