"""The batched sampler: one call per engine step turns each request's logits into its next token.

Processors run in this fixed order (each is skipped when no request in the batch uses it, and
runs only on the rows that do when some do not):

 0. structured output: rows with a grammar (`Request.structured`) get -inf at every token their
    grammar does not allow now (one bitmask for the batch, applied on the device)
 1. custom `logits_processors` of the request, in the order given: `fn(output_token_ids, logits)`
    (or `fn(prompt_token_ids, output_token_ids, logits)`), logits `[vocab]`
 2. `repetition_penalty` (transformers' form, over prompt and output tokens), then
    `presence_penalty` and `frequency_penalty` (OpenAI's form, over output tokens only)
 3. `no_repeat_ngram_size` (over prompt and output tokens)
 4. bad words (`Request.bad_words_token_ids`, matched against prompt and output tokens)
 5. `logit_bias`
 6. `allowed_token_ids`
 7. minimum length: EOS and stop token ids get -inf until `Request.min_tokens` tokens exist

If these leave a row without any finite logit (contradicting options, e.g. allowed_token_ids
that are all bad words), that row falls back to its raw logits rather than sampling garbage --
for a constrained row, to its logits after step 0 only: a grammar is never given up.
Greedy rows then take the argmax. Sampling rows go on with

 8. temperature -> top_k -> top_p -> min_p -> typical_p -> epsilon_cutoff -> eta_cutoff
 9. sampling by exponential race, `argmax(probs / Exp(1) noise)`: a row whose request has a
    `generator` draws its noise from it alone, so a seeded request yields the same tokens alone
    and inside any batch; the other rows share torch's default generator.

Log-probabilities are the raw `log_softmax` of the model's logits, before any processor
(vLLM's default "raw_logprobs"): they describe the model, not the decoding options.

Fast paths, each exact against the reference it replaces (tests/sample/test_sampler_fast.py):
- penalties read per-request token presence / counts kept on the device and updated with each
  step's new tokens (penalty_state.py), not rebuilt from the token lists;
- top_k / top_p / min_p are decided among each row's most likely tokens (candidates.py; one fused
  kernel on CUDA, candidates_triton.py) instead of sorting the vocabulary; a row whose candidates
  cannot prove its kept set comes back -1 and is redone with the full sort (`warp` + `draw`);
- what derives from the rows' options (which rows each processor and the choice take, candidate
  budgets, option columns on the device, penalty values) is built once while the same
  SamplingParams objects come back in the same order (per_batch.py): a steady decode batch.

Everything stays on `logits.device`; the only device -> host copy is the final `.tolist()` (and a
second one in the rare step that redoes a row).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ondo.sample import logits_processors as lp
from ondo.sample.candidates import candidate_budget, draw_candidates, select_candidates
from ondo.sample.penalty_state import PenaltyState
from ondo.sample.per_batch import derived
from ondo.sample.structured import apply_token_bitmask, fill_bitmask
from ondo.sample.token_history import TokenHistory


@dataclass
class SamplerOutput:
    token_ids: list[int]  # the chosen token of each request
    logprobs: list[float] | None  # raw log-prob of each chosen token; None when nobody needs them
    top_logprobs: list[list[tuple[int, float]]] | None  # the top `logprobs=k` (token, log-prob) per
    # request, most likely first ([] for requests that asked for none); None when nobody asked


class Sampler:
    """`Sampler()(logits [num_requests, vocab] float32, requests) -> SamplerOutput`.

    A request provides: sampling_params, prompt_token_ids, output_token_ids, generator,
    eos_token_ids (empty when ignore_eos), stop_token_ids, bad_words_token_ids, min_tokens,
    num_output_tokens, and structured (a GrammarState or None) (see docs/architecture.md, "Sampler").

    Keep one Sampler for the engine's lifetime: it caches token histories between steps."""

    def __init__(self) -> None:
        self._history = TokenHistory()
        self._penalties = PenaltyState()
        self.num_redone_rows = 0  # rows the candidates could not decide, sampled again (a statistic)
        self._bitmask_staging = BitmaskStaging()

    def __call__(self, logits: torch.Tensor, requests: Sequence[Any]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits must be [num_requests={len(requests)}, vocab], "
                             f"got {tuple(logits.shape)}")
        sample = self.sample_on_device(logits, requests)
        out = host_output(sample.to_read().tolist(), requests, sample.logprobs)   # the step's one host copy
        if min(out.token_ids) < 0:
            out = self.redo(sample, requests, out)
        return out

    def sample_on_device(self, logits: torch.Tensor, requests: Sequence[Any]) -> DeviceSample:
        """Steps 0-9 without reading anything back (async scheduling, engine/in_flight.py): the token
        ids on the device (-1 for a row that `redo` must decide), the processed logits `redo` needs,
        and the log-prob columns when a request asks for them."""
        plan = _plan_of(requests, logits)
        processed = self._apply_processors(logits, requests, plan)
        token_ids = self._choose(processed, requests, plan)
        logprobs = device_logprobs(logits, token_ids, requests) if plan.logprobs else None
        return DeviceSample(token_ids, processed, logprobs)

    def redo(self, sample: DeviceSample, requests: Sequence[Any], out: SamplerOutput) -> SamplerOutput:
        """`out` (a `sample_on_device` read back) with its -1 rows -- those whose kept set the candidates
        could not prove (a nucleus wider than the budget, ties past it) -- sampled by the full sort, and
        their chosen tokens' log-probs where asked for (the top ones do not depend on the choice): a
        second host copy, in those steps only."""
        rows = [i for i, t in enumerate(out.token_ids) if t < 0]
        self.num_redone_rows += len(rows)
        index = _long(rows, sample.processed.device)
        redone = draw(warp(sample.processed.index_select(0, index), [requests[i].sampling_params for i in rows]),
                      [requests[i].generator for i in rows])
        if out.logprobs is not None:
            chosen = sample.logprobs.log_probs[index, redone].tolist()
            for i, logprob in zip(rows, chosen):
                out.logprobs[i] = logprob
        for i, token in zip(rows, redone.tolist()):
            out.token_ids[i] = token
        return out

    # ---- steps 0-7: processors shared by greedy and sampling rows ------------------------------

    def apply_processors(self, logits: torch.Tensor, requests: Sequence[Any]) -> torch.Tensor:
        """Steps 0-7 (see the module docstring); returns new logits, the input is left intact."""
        return self._apply_processors(logits, requests, _plan_of(requests, logits))

    def _apply_processors(self, logits: torch.Tensor, requests: Sequence[Any], plan: _Plan) -> torch.Tensor:
        vocab_size = logits.shape[1]
        device = logits.device
        params = plan.params
        masked = False  # did a processor put -inf anywhere? (then check for empty rows)

        rows = [i for i, r in enumerate(requests) if getattr(r, "structured", None) is not None]
        if rows:
            bitmask = fill_bitmask([requests[i].structured for i in rows], vocab_size)  # [rows, words]
            bitmask = self._bitmask_staging.to_device(bitmask, device)
            logits = _on_rows(logits, rows, lambda x: apply_token_bitmask(x, bitmask))
        raw_logits = logits  # what an emptied row falls back to: the grammar's mask stays

        if plan.custom:
            logits = logits.clone()  # user code may edit in place; the raw logits stay intact
            for i in plan.custom:
                for fn in params[i].logits_processors:
                    logits[i] = _call_custom(fn, requests[i], logits[i])
            masked = True

        if plan.penalties:
            logits = _on_rows(logits, plan.penalties,
                              self._penalties_step([requests[i] for i in plan.penalties], vocab_size, device))

        for size, rows in plan.ngrams:
            sequences = lp.padded_left([self._history.full(requests[i]) for i in rows], -1, device)
            logits = _on_rows(logits, rows, lambda x: lp.apply_no_repeat_ngram(x, sequences, size))
            masked = True

        rows = [i for i, r in enumerate(requests) if r.bad_words_token_ids]
        if rows:
            logits = _on_rows(logits, rows, self._bad_words_step([requests[i] for i in rows], device))
            masked = True

        entries = [(i, t, b) for i in plan.logit_bias for t, b in params[i].logit_bias.items()]
        if entries:
            row_ids, token_ids, bias = zip(*entries)
            logits = lp.apply_logit_bias(logits, _long(row_ids, device), _long(token_ids, device),
                                         lp.host_to_device(bias, logits.dtype, device))

        entries = [(i, t) for i in plan.allowed for t in params[i].allowed_token_ids]
        if entries:
            row_ids, token_ids = zip(*entries)
            restricted = [p.allowed_token_ids is not None for p in params]
            logits = lp.apply_allowed_tokens(logits, _long(row_ids, device), _long(token_ids, device),
                                             lp.host_to_device(restricted, torch.bool, device))
            masked = True

        entries = [(i, t) for i, r in enumerate(requests) if _short_of_minimum(r)
                   for t in set(r.eos_token_ids) | set(r.stop_token_ids)]
        if entries:
            row_ids, token_ids = zip(*entries)
            logits = lp.apply_token_ban(logits, _long(row_ids, device), _long(token_ids, device))
            masked = True

        if masked:
            empty = torch.isneginf(logits).all(dim=-1, keepdim=True)  # [rows, 1]
            logits = torch.where(empty, raw_logits, logits)
        return logits

    def _penalties_step(self, requests: list[Any], vocab_size: int, device: torch.device) -> Callable:
        """Step 2 from the device-side token presence / counts of each request (penalty_state.py)."""
        params = [r.sampling_params for r in requests]
        values, need_seen, need_counts = derived(("penalty values", device), params, lambda: (lp.host_to_device(
            [[float(p.repetition_penalty), float(p.presence_penalty), float(p.frequency_penalty)] for p in params],
            torch.float32, device),  # [rows, 3]
            any(p.repetition_penalty != 1.0 for p in params), any(p.presence_penalty or p.frequency_penalty for p in params)))

        def apply(x: torch.Tensor) -> torch.Tensor:
            if x.is_cuda and x.dtype == torch.float32 and _triton_ready():
                from ondo.sample.penalties_triton import apply_penalties

                state = self._penalties.slots(requests, vocab_size, device, need_seen, need_counts)
                try:
                    return apply_penalties(x, state, values)
                except Exception:   # the kernel did not add the rows' new tokens: rebuilt next time
                    self._penalties.forget(requests)
                    raise
            state = self._penalties.rows(requests, vocab_size, device, need_seen, need_counts)
            penalty, presence, frequency = values.unbind(1)  # [rows] each
            # A row without a repetition penalty has penalty 1.0, and x / 1.0 == x * 1.0 == x.
            if need_seen:
                x = lp.apply_repetition_penalty(x, state.seen, penalty)
            if need_counts:
                x = lp.apply_presence_frequency(x, state.counts, presence, frequency)
            return x
        return apply

    def _bad_words_step(self, requests: list[Any], device: torch.device) -> Callable:
        """Build the tensors of step 4 for the rows that ban words; return the function to apply."""
        width = max(1, max(len(w) - 1 for r in requests for w in r.bad_words_token_ids))
        tails = lp.padded_left([self._history.tail(r, width) for r in requests], -2, device,
                               width)  # [rows, width]
        words = [(row, w) for row, r in enumerate(requests) for w in r.bad_words_token_ids]
        word_rows = _long([row for row, _ in words], device)
        # Same width as the tails; a one-token word has the prefix [-1] (= anything): always matches.
        prefixes = lp.padded_left([list(w[:-1]) for _, w in words], -1, device,
                                  width)  # [words, width]
        last = _long([w[-1] for _, w in words], device)
        return lambda x: lp.apply_bad_words(x, tails, word_rows, prefixes, last)

    # ---- steps 8-9: greedy argmax or warpers + sampling ----------------------------------------

    def _choose(self, logits: torch.Tensor, requests: Sequence[Any], plan: _Plan) -> torch.Tensor:
        """[rows] token ids; -1 for a row the candidates could not decide (see `redo`)."""
        params, sampling = plan.params, plan.sampling
        if not sampling:
            return logits.argmax(dim=-1)  # [rows]
        if len(sampling) == len(requests):
            return sample(logits, params, [r.generator for r in requests])
        token_ids = logits.argmax(dim=-1)  # [rows]; the sampling rows are overwritten below
        index = _long(sampling, logits.device)
        sampled = sample(logits.index_select(0, index), [params[i] for i in sampling],
                         [requests[i].generator for i in sampling])
        return token_ids.index_copy(0, index, sampled)


@dataclass
class _Plan:
    """Which rows each processor and the choice take, from the batch's SamplingParams alone: built once
    while the same params objects come back in the same order (per_batch.py) instead of a dozen scans
    of every row a step (at 256 rows those cost more host time than the step's kernels)."""
    params: list[Any]
    custom: list[int]                  # rows with custom logits processors
    penalties: list[int]               # rows with a repetition, presence or frequency penalty
    ngrams: list[tuple[int, list[int]]]  # (no_repeat_ngram_size, its rows), sizes ascending
    logit_bias: list[int]              # rows with a logit_bias
    allowed: list[int]                 # rows with allowed_token_ids (empty lists too: nothing allowed)
    sampling: list[int]                # rows that sample (the others take the argmax)
    logprobs: bool                     # a row wants log-probs (or ranks by them: best_of > n)


def _plan_of(requests: Sequence[Any], logits: torch.Tensor) -> _Plan:
    params = [r.sampling_params for r in requests]
    return derived(("sampler plan", logits.shape[1], logits.device), params, lambda: _build_plan(params))


def _build_plan(params: list[Any]) -> _Plan:
    rows_where = lambda keep: [i for i, p in enumerate(params) if keep(p)]  # noqa: E731
    return _Plan(
        params=params,
        custom=rows_where(lambda p: p.logits_processors),
        penalties=rows_where(lambda p: p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty),
        ngrams=[(size, rows_where(lambda p: p.no_repeat_ngram_size == size))
                for size in sorted({p.no_repeat_ngram_size for p in params} - {0})],
        logit_bias=rows_where(lambda p: p.logit_bias),
        allowed=rows_where(lambda p: p.allowed_token_ids is not None),
        sampling=rows_where(lambda p: not p.greedy),
        logprobs=any(p.logprobs is not None or p.best_of > p.n for p in params))


class BitmaskStaging:
    """Host -> device copies of the grammar bitmask through one reused pinned buffer. From pageable
    memory the copy may hold the host until the device reaches it, i.e. until the forward launched
    before it (async scheduling, engine/in_flight.py) is done; pinning a fresh buffer each step costs
    ~1 ms. A mask already in pinned memory (filled ahead by `prefetch_bitmask`) is copied as it is."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None   # [rows, words] int32, pinned
        self._copied: torch.cuda.Event | None = None   # the last copy out of the buffer

    def to_device(self, bitmask: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return bitmask.to(device)
        if bitmask.is_pinned():   # torch's pinned allocator keeps it until this copy is done
            return bitmask.to(device, non_blocking=True)
        rows, words = bitmask.shape
        if self._buffer is None or self._buffer.shape[0] < rows or self._buffer.shape[1] != words:
            self._buffer = torch.empty((max(rows, 64), words), dtype=torch.int32, pin_memory=True)
        elif self._copied is not None:
            self._copied.synchronize()   # the previous step's copy has left the buffer (it always has by now)
        staged = self._buffer[:rows]
        staged.copy_(bitmask)
        on_device = staged.to(device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return on_device


def sample(logits: torch.Tensor, params: Sequence[Any],
           generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Steps 8-9 for sampling rows: the candidates' fast path (candidates.py) for the rows it
    covers, `warp` + `draw` for the others. [rows] token ids, -1 where the full sort must decide."""
    vocab_size = logits.shape[1]
    budgets, fast, slow = derived(("candidate budgets", vocab_size), params, lambda: _budgets(params, vocab_size))
    if not fast:
        return draw(warp(logits, params), generators)
    if not slow:
        return _sample_candidates(logits, params, budgets, generators)
    fast_index, slow_index = _long(fast, logits.device), _long(slow, logits.device)
    token_ids = torch.empty(len(params), dtype=torch.long, device=logits.device)  # [rows]
    fast_tokens = _sample_candidates(logits.index_select(0, fast_index), [params[i] for i in fast],
                                     [budgets[i] for i in fast], [generators[i] for i in fast])
    slow_tokens = draw(warp(logits.index_select(0, slow_index), [params[i] for i in slow]),
                       [generators[i] for i in slow])
    return token_ids.index_copy_(0, fast_index, fast_tokens).index_copy_(0, slow_index, slow_tokens)


def _budgets(params: Sequence[Any], vocab_size: int) -> tuple[list[int | None], list[int], list[int]]:
    """Each row's candidate budget; the rows that have one, and the others."""
    budgets = [candidate_budget(p, vocab_size) for p in params]
    return (budgets, [i for i, b in enumerate(budgets) if b is not None],
            [i for i, b in enumerate(budgets) if b is None])


def warp(logits: torch.Tensor, params: Sequence[Any]) -> torch.Tensor:
    """Step 8 on the logits of sampling rows: temperature -> top_k -> top_p -> min_p ->
    typical_p -> epsilon_cutoff -> eta_cutoff, each only when a row uses it."""
    device = logits.device
    all_rows = range(len(params))
    if any(p.temperature != 1.0 for p in params):
        logits = lp.apply_temperature(logits, _row_values(params, all_rows, "temperature", device))
    vocab_size = logits.shape[1]
    k_values = [p.top_k if p.top_k != -1 else vocab_size for p in params]
    k_used = [k for k in k_values if k < vocab_size]  # a top_k >= vocab keeps every token
    top_k = _long(k_values, device) if k_used else None
    if any(p.top_p < 1.0 for p in params):  # one sort serves top_k and top_p
        logits = lp.apply_top_k_top_p(logits, top_k, _row_values(params, all_rows, "top_p", device))
    elif top_k is not None:
        logits = lp.apply_top_k(logits, top_k, max(k_used))
    if any(p.min_p > 0 for p in params):
        logits = lp.apply_min_p(logits, _row_values(params, all_rows, "min_p", device))
    rows = [i for i, p in enumerate(params) if p.typical_p < 1.0]
    if rows:
        mass = _row_values(params, rows, "typical_p", device)
        logits = _on_rows(logits, rows, lambda x: lp.apply_typical(x, mass))
    if any(p.epsilon_cutoff > 0 for p in params):
        epsilon = _row_values(params, all_rows, "epsilon_cutoff", device)
        logits = lp.apply_epsilon_cutoff(logits, epsilon)
    if any(p.eta_cutoff > 0 for p in params):
        logits = lp.apply_eta_cutoff(logits, _row_values(params, all_rows, "eta_cutoff", device))
    return logits


def draw(logits: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Step 9: one token per row from softmax(logits), by exponential race. A row with a
    generator takes its noise from that generator alone (always vocab draws per step)."""
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    noise = torch.empty_like(probs)  # [rows, vocab]: Exp(1) draws
    if any(g is None for g in generators):
        noise.exponential_()
    for row, generator in enumerate(generators):
        if generator is None:
            continue
        if generator.device.type == noise.device.type:
            noise[row].exponential_(generator=generator)
        else:  # a host generator for device logits: draw on its device, then copy
            draws = torch.empty(noise.shape[1], device=generator.device)
            noise[row].copy_(draws.exponential_(generator=generator))
    # An Exp(1) draw can be exactly 0; the floor keeps probs / noise finite (and 0 for p = 0).
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)  # [rows]


# The fused kernels (candidates_triton.py, penalties_triton.py) on CUDA; tests and benchmarks may
# turn them off. None = not checked yet that Triton imports.
USE_TRITON: bool | None = None


def _triton_ready() -> bool:
    global USE_TRITON
    if USE_TRITON is None:
        try:
            import triton  # noqa: F401
            USE_TRITON = True
        except ImportError:  # PyTorch's operations do the same work, with more launches
            USE_TRITON = False
    return USE_TRITON


def _sample_candidates(logits: torch.Tensor, params: Sequence[Any], budgets: Sequence[int],
                       generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    if logits.is_cuda and _triton_ready():
        from ondo.sample.candidates_triton import sample_candidates

        return sample_candidates(logits, params, budgets, generators)
    return draw_candidates(select_candidates(logits, params, budgets), generators)


@dataclass
class DeviceLogprobs:
    """Log-probs of a step sampled on the device, not read back yet."""
    log_probs: torch.Tensor  # [rows, vocab] raw log-softmax (a row redone later takes its choice's from it)
    columns: torch.Tensor    # [rows, 2 + 2 k_max] float64: token, its log-prob, the top k_max ids, their log-probs
    k_max: int


@dataclass
class DeviceSample:
    token_ids: torch.Tensor                # [rows] int64; -1 = left to `Sampler.redo`
    processed: torch.Tensor                # [rows, vocab] the processed logits `redo` draws from
    logprobs: DeviceLogprobs | None        # None when no request asks for log-probs

    def to_read(self) -> torch.Tensor:
        """What the host reads back: the log-prob columns (token first) when asked for, else the token ids."""
        return self.logprobs.columns if self.logprobs is not None else self.token_ids


def device_logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor,
                    requests: Sequence[Any]) -> DeviceLogprobs | None:
    """The chosen tokens' raw log-probs and the top-k, as one tensor to copy back; None when no request
    needs them (logprobs, or best_of > n, which ranks by them)."""
    params = [r.sampling_params for r in requests]
    if not any(p.logprobs is not None or p.best_of > p.n for p in params):
        return None
    log_probs = raw_logits.float().log_softmax(dim=-1)  # [rows, vocab]
    chosen = log_probs.gather(1, token_ids.clamp(min=0)[:, None])  # [rows, 1]; -1: redone later
    k_max = min(max(p.logprobs or 0 for p in params), raw_logits.shape[1])
    columns = [token_ids[:, None].double(), chosen.double()]
    if k_max:
        top = log_probs.topk(k_max, dim=-1)  # [rows, k_max]
        columns += [top.indices.double(), top.values.double()]
    return DeviceLogprobs(log_probs, torch.cat(columns, dim=1), k_max)  # float64 holds ids and float32 exactly


def host_output(host: list, requests: Sequence[Any], logprobs: DeviceLogprobs | None) -> SamplerOutput:
    """A `SamplerOutput` from `DeviceSample.to_read()` read back: token ids, or the log-prob columns."""
    if logprobs is None:
        return SamplerOutput(host, None, None)
    k_max = logprobs.k_max
    params = [r.sampling_params for r in requests]
    tokens = [int(row[0]) for row in host]
    chosen_logprobs = [row[1] for row in host]
    if not k_max:
        return SamplerOutput(tokens, chosen_logprobs, None)
    top_logprobs = []
    for p, row in zip(params, host):
        k = p.logprobs or 0
        top_logprobs.append([(int(t), v) for t, v in zip(row[2:2 + k], row[2 + k_max:2 + k_max + k])])
    return SamplerOutput(tokens, chosen_logprobs, top_logprobs)


def prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor | Sequence[int],
                    k: int) -> list[dict[int, float]]:
    """Raw log-probs of prompt tokens: `logits[i]` ([n, vocab], the model's output at prompt
    position i) scored against `target_ids[i]` (the prompt token at position i + 1).
    Returns one dict per position: the target token first, then the top k (the target may be
    among them, so a dict holds k or k + 1 entries)."""
    log_probs = logits.float().log_softmax(dim=-1)  # [n, vocab]
    targets = torch.as_tensor(target_ids, dtype=torch.long, device=logits.device)  # [n]
    columns = [targets[:, None].double(), log_probs.gather(1, targets[:, None]).double()]
    k = min(k, logits.shape[1])
    if k > 0:
        top = log_probs.topk(k, dim=-1)  # [n, k]
        columns += [top.indices.double(), top.values.double()]
    result = []
    for row in torch.cat(columns, dim=1).tolist():
        entry = {int(row[0]): row[1]}
        for t, v in zip(row[2:2 + k], row[2 + k:]):
            entry.setdefault(int(t), v)
        result.append(entry)
    return result


# ---- helpers --------------------------------------------------------------------------------


def _on_rows(logits: torch.Tensor, rows: Sequence[int],
             fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply `fn` to the listed rows only (to all of them at once when every row is listed)."""
    if len(rows) == logits.shape[0]:
        return fn(logits)
    index = _long(rows, logits.device)
    return logits.index_copy(0, index, fn(logits.index_select(0, index)))


def _row_values(params: list[Any], rows: Sequence[int], name: str,
                device: torch.device) -> torch.Tensor:
    values = [float(getattr(params[i], name)) for i in rows]
    return lp.host_to_device(values, torch.float32, device)  # [len(rows)]


def _long(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return lp.host_to_device(values, torch.long, device)


def _short_of_minimum(request: Any) -> bool:
    # min_tokens first: most requests have none, and then their output length is not looked up
    return bool(request.min_tokens) and request.num_output_tokens < request.min_tokens


def _call_custom(fn: Callable, request: Any, logits: torch.Tensor) -> torch.Tensor:
    """vLLM's per-request processor: fn(output_ids, logits), or fn(prompt_ids, output_ids, logits)."""
    try:
        arity = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature: assume the common form
        arity = 2
    if arity == 3:
        result = fn(list(request.prompt_token_ids), list(request.output_token_ids), logits)
    else:
        result = fn(list(request.output_token_ids), logits)
    if not isinstance(result, torch.Tensor) or result.shape != logits.shape:
        raise ValueError(f"logits processor {fn!r} must return a tensor of shape "
                         f"{tuple(logits.shape)}, got {getattr(result, 'shape', type(result))}")
    return result
