"""Decode steps launched one step ahead of the host ("async scheduling").

A synchronous decode step leaves the GPU idle while the host builds inputs, waits for the sampled
tokens, checks stops and schedules the next step. Here, once decode step N is launched, step N+1 is
launched too, before N's tokens reach the host: N's sampled ids stay on the device and become N+1's
input ids, while positions, slots and sequence lengths are known on the host (one past N's). The host
then reads N's tokens (a copy queued behind N) and does N's stop checks and outputs while N+1 runs.

The scheduler stays the one judge of what runs. Step N+1 is a guess made before N's tokens are
known; at the next `step()` the real schedule is built and compared with it:
 - the same requests in the same order, one token each: the launched step is adopted;
 - the same but for requests that finished meanwhile (EOS, a stop token or string, an abort), with
   the batch padded to the same graph size: adopted, the finished rows' tokens dropped. A row of a
   decode graph is computed by the same kernels whatever the other rows hold, so the other rows'
   tokens are those a fresh step would give;
 - otherwise it is discarded and the real schedule runs. A discarded step wrote only K/V of known
   tokens, at positions that the next step writes again or into freed blocks (the stream orders those
   writes before any later use of the blocks); nothing of it reaches the outputs.

Batches whose sampling does not read the newest token on the host are launched ahead whole, forward
and sampling: no logprobs, no_repeat_ngram, bad words, custom logits processors or structured output,
no seeded sampling, and min_tokens reached. Penalties count the newest token from the device
(`Sampler.apply_processors(pending_token_ids=)`). A sampled row the sampler's candidates could not
decide comes back as -1: the host redoes it with the full sort when it reads the step (`Sampler.redo`),
and the step launched on a placeholder for it is discarded.

Any other batch without log-probs (a grammar's mask for step N+1 depends on N's token, and so do
n-gram and bad-word bans, custom processors, unmet min_tokens; seeded rows must draw only for steps
that are kept) launches only the forward of N+1 ahead (`LaunchedForward`), vLLM's order: the device
computes N+1's logits while the host reads N's tokens, advances the matchers (`apply_sampled` ->
`GrammarState.accept`), starts filling N+1's grammar masks on a background thread
(`prefetch_bitmask`) and checks stops; at the next `step()`, once adopted, N+1 is sampled with
every token before it on the host, exactly as the synchronous path samples, and the forward of N+2
is launched from those sampled ids before they are read. Nothing is drawn for a step that is
discarded: it was never sampled, so seeded requests stay reproducible. Only log-probs (best_of > n
ranks by them) keep a batch synchronous. A sampling error there (a grammar with no way forward, a
failing processor) is handled as the synchronous path does: the batch is sampled again request by
request.
Every other step takes the synchronous path, `Engine.run_schedule`, unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ondo.engine.output_processor import SequenceDelta
from ondo.engine.request import Request
from ondo.engine.scheduler import ScheduledRequest, SchedulerOutput
from ondo.sample.sampler import SamplerOutput
from ondo.sample.structured import prefetch_bitmask

if TYPE_CHECKING:
    from ondo.engine.engine import Engine

logger = logging.getLogger("ondo")


@dataclass
class LaunchedStep:
    """A decode step queued on the device whose tokens the host has not read yet."""
    requests: list[Request]            # the batch's rows, in order
    token_ids: torch.Tensor            # [rows] int64 on the device: the chosen tokens (-1: see Sampler.redo)
    host_token_ids: torch.Tensor       # [rows] int64 host copy, valid once `copied` has completed
    copied: torch.cuda.Event | None    # None when the device is the host
    processed: torch.Tensor | None = None   # [rows, vocab] the sampler's processed logits, for Sampler.redo

    def read(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_token_ids.tolist()


@dataclass
class LaunchedForward:
    """A decode step whose forward is queued on the device but not sampled yet: its sampling needs the
    previous step's tokens on the host (a grammar's mask). Sampled once the step is adopted."""
    requests: list[Request]            # the batch's rows, in order
    logits: torch.Tensor               # [rows, vocab] float32 on the device (a graph's output buffer)


def samples_without_host_history(request: Request) -> bool:
    """True when the sampler's choice for this request needs none of its tokens on the host: only
    history-free processors (logit_bias, allowed_token_ids) or penalties (the sampler counts the
    token still on the device) apply. Seeded sampling stays synchronous: a discarded step would
    have used the request's own random draws."""
    params = request.sampling_params
    return ((params.greedy or request.generator is None) and params.logprobs is None
            and params.best_of <= params.n and not params.logits_processors
            and not params.no_repeat_ngram_size and not request.bad_words_token_ids
            and not request.wants_prompt_logprobs
            # a grammar's mask depends on the previous token, which is not on the host yet
            and params.structured_outputs is None)


def samples_after_its_forward(request: Request) -> bool:
    """True when the request may be sampled once its previous token is on the host but before it is
    read back: everything but log-probs (read back with the token) is then decided from host state."""
    params = request.sampling_params
    return params.logprobs is None and params.best_of <= params.n and not request.wants_prompt_logprobs


class DecodeOverlap:
    """Drives `Engine.step()` with decode steps launched one ahead (see the module docstring)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.ahead: LaunchedStep | LaunchedForward | None = None
        self.num_adopted = 0       # steps launched ahead and adopted (wholly or but finished rows)
        self.num_discarded = 0     # steps launched ahead that the real schedule did not match

    def step(self) -> list[SequenceDelta]:
        engine = self.engine
        ahead, self.ahead = self.ahead, None
        schedule = engine.scheduler.schedule()
        rows = self._matching_rows(ahead, schedule) if ahead is not None else None
        requests = [item.request for item in schedule.scheduled]
        if rows is not None:
            self.num_adopted += 1
            engine.scheduler.update_after_step(schedule)
            if isinstance(ahead, LaunchedForward):   # the previous step's tokens are on the host now
                current = self._sample_or_fail(requests, self._gather(ahead.logits, rows))
                rows = list(range(len(requests)))
            else:
                current = ahead
        else:
            self.num_discarded += ahead is not None
            if schedule.is_empty:
                return []
            if not self._launchable(schedule):
                return engine.run_schedule(schedule)
            try:
                result = engine.runner.execute(schedule)
                engine.scheduler.update_after_step(schedule)
            except Exception as error:  # as the synchronous path: fail the requests, never the engine
                logger.exception("model forward failed")
                return engine._fail(requests, f"model forward failed: {error}")
            current = self._sample_or_fail(requests, result.sample_logits)
            rows = list(range(len(requests)))
        if isinstance(current, dict):   # sampled synchronously, request by request: nothing launched
            return engine.emit(current)
        self.ahead = self._launch_ahead(requests, rows, current)
        host_tokens = current.read()
        if current.processed is not None and min(host_tokens) < 0:   # rows the sampler's candidates left open
            host_tokens = engine.sampler.redo(current.processed, current.requests, host_tokens)
            if self.ahead is not None:   # it was launched on a placeholder token for those rows
                self.ahead, self.num_discarded = None, self.num_discarded + 1
        sampled = SamplerOutput([host_tokens[row] for row in rows], None, None)
        touched = engine.apply_sampled(requests, sampled)
        if isinstance(self.ahead, LaunchedForward):   # its grammars' masks fill while this step is emitted
            self._prefetch_masks(self.ahead)
        return engine.emit(touched)

    def _prefetch_masks(self, ahead: LaunchedForward) -> None:
        """Start filling the grammar masks that sampling `ahead` will ask for; on a GPU into pinned
        memory the sampler copies to the device as it is (no staging copy: ~0.4 ms a step at 64 rows,
        128k vocabulary)."""
        states = [r.structured for r in ahead.requests if r.structured is not None and not r.is_finished]
        prefetch_bitmask(states, ahead.logits.shape[1], pinned=ahead.logits.is_cuda)

    # ---- deciding -------------------------------------------------------------------------------

    def _launchable(self, schedule: SchedulerOutput) -> bool:
        """A decode-only step (one sampled token per request) of requests the device can sample alone,
        or that can be sampled after the next forward is launched (all but log-probs)."""
        if not all(item.num_new_tokens == 1 and item.samples for item in schedule.scheduled):
            return False
        requests = [item.request for item in schedule.scheduled]
        if all(samples_without_host_history(r) for r in requests):
            return True
        return all(map(samples_after_its_forward, requests))

    def _matching_rows(self, ahead: LaunchedStep | LaunchedForward, schedule: SchedulerOutput) -> list[int] | None:
        """Rows of `ahead` giving the scheduled requests' tokens, or None when it is not the step the
        scheduler chose."""
        requests = [item.request for item in schedule.scheduled]
        if not requests or any(item.num_new_tokens != 1 for item in schedule.scheduled):
            return None
        if requests == ahead.requests:
            return list(range(len(requests)))
        survivors = [i for i, r in enumerate(ahead.requests) if not r.is_finished]
        bucket = self.engine.runner.batch_bucket
        if [ahead.requests[i] for i in survivors] == requests and bucket(len(requests)) == bucket(len(ahead.requests)):
            return survivors
        return None

    def _finishes_by_length(self, request: Request) -> bool:
        """True when the token being sampled now is the request's last by max_tokens / max_model_len."""
        return (request.num_output_tokens + 1 >= request.max_tokens
                or request.num_tokens + 1 >= self.engine.max_model_len)

    # ---- launching ------------------------------------------------------------------------------

    def _launch_ahead(self, requests: list[Request], rows: list[int],
                      current: LaunchedStep) -> LaunchedStep | LaunchedForward | None:
        """Launch the decode step after `current` for the requests that cannot finish by length in it,
        when the scheduler would most likely choose that step too; None when it would not. Its
        sampling too when no row needs `current`'s tokens on the host for it (see the module docstring)."""
        scheduler = self.engine.scheduler
        if scheduler.running != requests:      # someone was left out of this step (token budget)
            return None
        keep = [i for i, r in enumerate(requests) if not self._finishes_by_length(r)]
        batch = [requests[i] for i in keep]
        if not batch or len(batch) > scheduler.max_num_batched_tokens:
            return None
        if scheduler.waiting and len(batch) < scheduler.max_num_seqs:   # the scheduler would admit one
            return None
        sample_now = all(samples_without_host_history(r) for r in batch)
        # Sampled now, the sampler sees each request one token short: min_tokens masking must be over.
        if sample_now and not all(r.num_output_tokens >= r.min_tokens for r in batch):
            return None
        blocks = scheduler.blocks
        if not all(blocks.allocate(r, r.num_computed_tokens + 1) for r in batch):
            return None   # blocks taken so far are the ones the next schedule allocates anyway
        token_rows = [rows[i] for i in keep]
        try:
            # A row the sampler left to Sampler.redo (-1) runs on a placeholder; the step is then discarded.
            input_ids = self._gather(current.token_ids, token_rows)       # [len(batch)]
            if current.processed is not None:
                input_ids = input_ids.clamp(min=0)
            schedule = SchedulerOutput([ScheduledRequest(r, 1) for r in batch], len(batch), [])
            result = self.engine.runner.execute(schedule, input_ids)
            if not sample_now:
                return LaunchedForward(batch, result.sample_logits)
            return self._sample(batch, result.sample_logits, input_ids)
        except Exception:   # the real schedule will run this step again and report any failure
            logger.exception("decode step launched ahead failed")
            return None

    def _sample_or_fail(self, requests: list[Request], logits: torch.Tensor) -> LaunchedStep | dict:
        """`_sample`, or when it raises (a grammar with no way forward, a failing processor), the
        synchronous sampler's request-by-request handling: the groups it touched, its requests' tokens
        applied or the failing ones finished with their error."""
        try:
            return self._sample(requests, logits)
        except Exception:
            return self.engine._sample(requests, logits)

    def _sample(self, requests: list[Request], logits: torch.Tensor,
                pending: torch.Tensor | None = None) -> LaunchedStep:
        """The sampler's choice, left on the device; the host copy queued. pending: the input ids, each
        request's newest token, not on the host yet (its penalties count it)."""
        token_ids, processed = self.engine.sampler.sample_on_device(logits, requests, pending)   # [rows]
        if all(r.sampling_params.greedy for r in requests):
            processed = None   # greedy rows never need Sampler.redo
        elif processed.data_ptr() == logits.data_ptr():
            processed = processed.clone()   # a graph's output buffer: the step launched next overwrites it
        if token_ids.device.type == "cpu":
            return LaunchedStep(requests, token_ids, token_ids, None, processed)
        host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host.copy_(token_ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return LaunchedStep(requests, token_ids, host, copied, processed)

    def _gather(self, values: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """values[rows] ([rows] token ids or [rows, vocab] logits), a view when rows are a prefix."""
        if rows == list(range(len(rows))):
            return values[:len(rows)]
        return values[self.engine.runner.to_device(np.array(rows, dtype=np.int64))]
