"""The text half of output processing: from the engine core's token deltas to RequestOutputs.

The engine core (scheduler -> model runner -> sampler) reports, per sequence and step, only what is
plain data: the new token ids, their log-probs, and a finish decided by tokens (EOS, a stop token, the
length, a grammar's end, an error) -- a `SequenceDelta`. Everything that needs the tokenizer happens
here, in whichever process serves the user: the in-process `Engine.step()`, or the API server's process
when the core runs in its own (ondo/engine/core), so that detokenizing never slows the step loop.

Per sequence: the incremental detokenizer, then stop strings (matched across token boundaries once
min_tokens is reached), then the RequestOutput with text and token deltas. While a stop string could
still be forming, its possible beginning is held back, so streamed text is always a prefix of the final
text. A stop string ends the sequence here; the caller tells the core to stop it (`process` returns
those sequences), and tokens the core made meanwhile are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ondo.engine.detokenizer import IncrementalDetokenizer
from ondo.engine.output_processor import SequenceDelta
from ondo.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from ondo.sampling_params import SamplingParams


@dataclass(eq=False)
class SequenceText:
    """One generated sequence as the user sees it."""
    index: int
    sampling_params: SamplingParams
    min_tokens: int                              # stop strings count only after this many tokens
    detokenizer: IncrementalDetokenizer | None
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    emitted_text_len: int = 0                    # output_text[:emitted_text_len] has been streamed
    emitted_token_len: int = 0
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    error_is_input: bool = False

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


@dataclass(eq=False)
class TextGroup:
    """The sequences generated for one user request (n / best_of candidates)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    n: int
    children: list[SequenceText] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


class OutputProcessor:
    """Turns the core's deltas into RequestOutputs for the requests registered with `add`."""

    def __init__(self, tokenizer: Any | None, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.groups: dict[str, TextGroup] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Register a request the core runs (call before its first delta can arrive)."""
        group = TextGroup(request_id, prompt, prompt_token_ids, params.n)
        try:
            max_tokens = params.resolve_max_tokens(len(prompt_token_ids), self.max_model_len)
        except ValueError:
            max_tokens = 0   # the core refuses it; nothing arrives for it
        min_tokens = min(params.resolve_min_tokens(len(prompt_token_ids)), max_tokens)
        for index in range(params.best_of or params.n):
            detokenizer = None
            if params.detokenize and self.tokenizer is not None:
                detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                                     params.spaces_between_special_tokens)
            child = SequenceText(index, params, min_tokens, detokenizer)
            if params.logprobs is not None:
                child.logprobs = []
            group.children.append(child)
        self.groups[request_id] = group

    def forget(self, request_id: str) -> None:
        self.groups.pop(request_id, None)

    def process(self, deltas: list[SequenceDelta]) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """The RequestOutputs of the groups these deltas touched, and the sequences (request id, index)
        that a stop string ended here, which the core must stop."""
        touched: dict[str, TextGroup] = {}
        stopped: list[tuple[str, int]] = []
        for delta in deltas:
            group = self.groups.get(delta.request_id)
            if group is None:
                continue   # aborted, or already finished here
            child = group.children[delta.index]
            if child.is_finished:
                continue   # a stop string ended it; the core ran on until it heard
            if delta.prompt_logprobs is not None:
                group.prompt_logprobs = [self._named(p) for p in delta.prompt_logprobs]
            group.num_cached_tokens = delta.num_cached_tokens
            if self._apply(child, delta):
                stopped.append((group.request_id, child.index))
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            output = group_output(group)
            if group.finished:
                del self.groups[group.request_id]
            if output is not None:
                outputs.append(output)
        return outputs, stopped

    def _apply(self, child: SequenceText, delta: SequenceDelta) -> bool:
        """Append the delta's tokens and text; True when a stop string ended the sequence here."""
        child.output_token_ids.extend(delta.token_ids)
        child.cumulative_logprob = delta.cumulative_logprob
        if child.logprobs is not None and delta.logprobs:
            child.logprobs.extend(self._named(p) for p in delta.logprobs)
        if child.detokenizer is not None and delta.token_ids:
            child.output_text += child.detokenizer.push(delta.token_ids)
        # Stop strings rank after EOS and stop tokens but before the length limit (as one check would).
        by_string = delta.finish_reason in (None, "length") and self._stop_string_matched(child)
        if delta.finish_reason is not None:
            if not by_string:
                child.finish_reason, child.stop_reason = delta.finish_reason, delta.stop_reason
                if child.detokenizer is not None:   # release what the detokenizer held back
                    child.output_text += child.detokenizer.flush()
            child.error, child.error_is_input = delta.error, delta.error_is_input
            return False   # the core has finished it already
        return by_string

    def _stop_string_matched(self, child: SequenceText) -> bool:
        return (bool(child.sampling_params.stop) and child.detokenizer is not None
                and child.num_output_tokens > child.min_tokens and _match_stop_string(child))

    def _named(self, position: PositionLogprobs | None) -> PositionLogprobs | None:
        """Log-prob entries with their tokens' text (the core sends ids only)."""
        if position is None or self.tokenizer is None:
            return position
        return {tid: Logprob(lp.logprob, lp.rank, self.tokenizer.decode([tid], skip_special_tokens=False))
                for tid, lp in position.items()}


def _match_stop_string(child: SequenceText) -> bool:
    params, text = child.sampling_params, child.output_text
    longest = max(len(s) for s in params.stop)
    # Only text that could contain a match not seen before: the unemitted tail plus a stop's length.
    window_start = max(0, child.emitted_text_len - longest)
    best = None
    for stop in params.stop:
        index = text.find(stop, window_start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return False
    index, stop = best
    child.output_text = text[:index + len(stop)] if params.include_stop_str_in_output else text[:index]
    child.finish_reason, child.stop_reason = "stop", stop
    return True


def completion_of(child: SequenceText) -> CompletionOutput:
    """The sequence's output so far, with the text and tokens new since the last call as deltas."""
    params = child.sampling_params
    upto = len(child.output_text)
    if not child.is_finished and params.stop:
        upto -= max(len(s) for s in params.stop) - 1   # a stop string may still be forming
    upto = max(upto, child.emitted_text_len)
    text_delta = child.output_text[child.emitted_text_len:upto]
    token_delta = child.output_token_ids[child.emitted_token_len:]
    child.emitted_text_len, child.emitted_token_len = upto, child.num_output_tokens
    return CompletionOutput(
        index=child.index, text=child.output_text[:upto], token_ids=list(child.output_token_ids),
        cumulative_logprob=child.cumulative_logprob, logprobs=child.logprobs,
        finish_reason=child.finish_reason, stop_reason=child.stop_reason,
        text_delta=text_delta, token_ids_delta=token_delta)


def group_output(group: TextGroup) -> RequestOutput | None:
    """The group's RequestOutput; with best_of > n, only once all candidates are done (then the n best)."""
    best_of = len(group.children)
    finished = group.finished
    if best_of > group.n:
        if not finished:
            return None
        ranked = sorted(group.children, key=lambda c: c.cumulative_logprob or 0.0, reverse=True)[:group.n]
        outputs = [completion_of(c) for c in ranked]
        for i, output in enumerate(outputs):
            output.index = i
    else:
        outputs = [completion_of(c) for c in group.children]
    failed = next((c for c in group.children if c.error), None)
    return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs, finished,
                         prompt_logprobs=group.prompt_logprobs, num_cached_tokens=group.num_cached_tokens,
                         error=failed and failed.error, error_is_input=failed is not None and failed.error_is_input)
