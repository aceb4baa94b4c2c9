"""After sampling: append tokens, detokenize, check every stop condition, and build RequestOutputs.

Stop conditions, in order: a constrained request's grammar terminated (its stop token taken); EOS /
stop_token_ids (once min_tokens is reached), stop strings (matched across token boundaries on the
detokenized text), then the length limit. While a stop string could
still be forming, its possible beginning is held back from the stream, so streamed text is always a
prefix of the final text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ondo.engine.request import Request
from ondo.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput


@dataclass(eq=False)
class RequestGroup:
    """The sequences generated for one user request (n / best_of candidates)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    n: int
    children: list[Request] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


def append_token(request: Request, token_id: int, logprob: float | None,
                 top: list[tuple[int, float]] | None, decode_token) -> None:
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
            position[tid] = Logprob(lp, rank, decode_token(tid))
        if token_id not in position:
            position[token_id] = Logprob(logprob if logprob is not None else float("nan"), None, decode_token(token_id))
        request.logprobs.append(position)
    if request.detokenizer is not None:
        request.output_text += request.detokenizer.push([token_id])


def check_stop(request: Request, token_id: int, max_model_len: int) -> bool:
    """Sets finish_reason / stop_reason and truncates the text at a stop string; True when finished."""
    params = request.sampling_params
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
        if params.stop and request.detokenizer is not None and _match_stop_string(request):
            return True
    if request.num_output_tokens >= request.max_tokens or request.num_tokens >= max_model_len:
        return _finish(request, "length", None)
    return False


def _finish(request: Request, reason: str, stop_reason) -> bool:
    request.finish_reason, request.stop_reason = reason, stop_reason
    return True


def _match_stop_string(request: Request) -> bool:
    params, text = request.sampling_params, request.output_text
    longest = max(len(s) for s in params.stop)
    # Only text that could contain a match not seen before: the unemitted tail plus a stop's length.
    window_start = max(0, request.emitted_text_len - longest)
    best = None
    for stop in params.stop:
        index = text.find(stop, window_start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return False
    index, stop = best
    request.output_text = text[:index + len(stop)] if params.include_stop_str_in_output else text[:index]
    return _finish(request, "stop", stop)


def finalize_text(request: Request) -> None:
    """At finish: release what the detokenizer held back (unless a stop string already cut the text)."""
    if request.detokenizer is not None and not isinstance(request.stop_reason, str):
        request.output_text += request.detokenizer.flush()


def completion_of(request: Request) -> CompletionOutput:
    """The request's output so far, with the text and tokens new since the last call as deltas."""
    params = request.sampling_params
    upto = len(request.output_text)
    if not request.is_finished and params.stop:
        upto -= max(len(s) for s in params.stop) - 1   # a stop string may still be forming
    upto = max(upto, request.emitted_text_len)
    text_delta = request.output_text[request.emitted_text_len:upto]
    token_delta = request.output_token_ids[request.emitted_token_len:]
    request.emitted_text_len, request.emitted_token_len = upto, request.num_output_tokens
    return CompletionOutput(
        index=request.index, text=request.output_text[:upto], token_ids=list(request.output_token_ids),
        cumulative_logprob=request.cumulative_logprob, logprobs=request.logprobs,
        finish_reason=request.finish_reason, stop_reason=request.stop_reason,
        text_delta=text_delta, token_ids_delta=token_delta)


def group_output(group: RequestGroup) -> RequestOutput | None:
    """The group's RequestOutput; with best_of > n, only once all candidates are done (then the n best)."""
    best_of = len(group.children)
    finished = group.finished
    if best_of > group.n:
        if not finished:
            return None
        ranked = sorted(group.children, key=lambda r: r.cumulative_logprob or 0.0, reverse=True)[:group.n]
        outputs = [completion_of(r) for r in ranked]
        for i, output in enumerate(outputs):
            output.index = i
    else:
        outputs = [completion_of(r) for r in group.children]
    leader = group.children[0]
    failed = next((c for c in group.children if c.error), None)
    return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs, finished,
                         prompt_logprobs=leader.prompt_logprobs, num_cached_tokens=leader.num_cached_tokens,
                         error=failed and failed.error, error_is_input=failed is not None and failed.error_is_input)
