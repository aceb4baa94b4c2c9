"""The engine core's half of output processing: append sampled tokens, check the stops that tokens
decide, and report each sequence's news as a plain-data `SequenceDelta`.

Stop conditions here, in order: a failure of the request alone; a constrained request's grammar
terminated (its stop token taken); EOS / stop_token_ids (once min_tokens is reached); the length limit.
Stop strings need text, so they are checked where the text is made (ondo/engine/text_output.py), which
tells the core to stop the sequence.
"""
from __future__ import annotations

import msgspec

from ondo.engine.request import Request
from ondo.outputs import Logprob, PositionLogprobs


class SequenceDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one sequence gained in one step (plain data: it crosses to the API server's process)."""
    request_id: str                  # the user's request (the group of n / best_of sequences)
    index: int                       # the sequence among the group's candidates
    token_ids: list[int]             # tokens new since the previous delta
    logprobs: list[PositionLogprobs] | None = None   # one per new token; decoded_token unset
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None   # the stop token id that matched
    error: str | None = None         # why the sequence failed alone (finish_reason "error")
    error_is_input: bool = False     # ...because of its own options
    num_cached_tokens: int = 0       # prompt tokens served by the prefix cache
    prompt_logprobs: list[PositionLogprobs | None] | None = None   # the whole list, in the first delta


def append_token(request: Request, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
    request.output_token_ids.append(token_id)
    if request.structured is not None:
        try:
            request.structured.accept(token_id)
        except ValueError as error:  # the grammar refused the token: check_stop fails the request
            # A failure of this request's constraint (see GrammarState.accept), not of the engine.
            request.error, request.error_is_input = str(error), True
    if logprob is not None:
        request.cumulative_logprob = (request.cumulative_logprob or 0.0) + logprob
    if request.logprobs is not None:
        position: PositionLogprobs = {}
        for rank, (tid, lp) in enumerate(top or [], start=1):
            position[tid] = Logprob(lp, rank)
        if token_id not in position:
            position[token_id] = Logprob(logprob if logprob is not None else float("nan"), None)
        request.logprobs.append(position)


def check_stop(request: Request, token_id: int, max_model_len: int) -> bool:
    """Sets finish_reason / stop_reason for the stops tokens decide; True when finished."""
    if request.error is not None:
        return _finish(request, "error", None)
    if request.structured is not None and request.structured.is_terminated:
        # The grammar ended and its stop token was taken (allowed even before min_tokens).
        return _finish(request, "stop", None)
    if request.num_output_tokens > request.min_tokens:  # the sampler masked EOS and stops until then
        if token_id in request.eos_token_ids:
            return _finish(request, "stop", None)
        if token_id in request.stop_token_ids:
            return _finish(request, "stop", token_id)
    if request.num_output_tokens >= request.max_tokens or request.num_tokens >= max_model_len:
        return _finish(request, "length", None)
    return False


def _finish(request: Request, reason: str, stop_reason) -> bool:
    request.finish_reason, request.stop_reason = reason, stop_reason
    return True


def take_delta(request: Request) -> SequenceDelta | None:
    """The request's news since its previous delta (None when there is none)."""
    start = request.emitted_token_len
    finished = request.finish_reason is not None
    if start == len(request.output_token_ids) and (not finished or request.finish_reported):
        return None
    request.emitted_token_len = len(request.output_token_ids)
    request.finish_reported = finished
    prompt_logprobs = None
    if request.index == 0 and request.prompt_logprobs is not None and not request.prompt_logprobs_reported:
        prompt_logprobs, request.prompt_logprobs_reported = request.prompt_logprobs, True
    return SequenceDelta(
        request.group_id, request.index, request.output_token_ids[start:],
        request.logprobs[start:] if request.logprobs is not None else None,
        request.cumulative_logprob, request.finish_reason,
        request.stop_reason if isinstance(request.stop_reason, int) else None,
        request.error, request.error_is_input, request.num_cached_tokens, prompt_logprobs)
