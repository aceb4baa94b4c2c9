"""Structured output: decoding constrained by a JSON schema, a regex, a list of choices or an EBNF grammar.

`StructuredOutputsParams` (vLLM's shape) says which constraint a request wants; exactly one of its
fields is set, and it is parsed when built, so a bad schema or regex is a `SamplingParamsError` at
`SamplingParams` time naming the field and the reason. The grammar is compiled against the
model's vocabulary when the request is added (`grammar_cache.py`, cached), where a constraint the
vocabulary cannot write is refused; each sequence then owns a `GrammarState`, a matcher that
follows the tokens it generates.

Every step, the sampler asks the states of the constrained rows for one bitmask row each
(`fill_bitmask`, a host int32 tensor `[rows, ceil(vocab / 32)]`), copies it to the device once and
masks the logits there (`apply_token_bitmask`) before any other processor: a constrained row can
only ever choose a token its grammar allows. Stop tokens are allowed only where the grammar may
end; once the matcher has accepted one it is terminated and the request finishes.

The fill is the host's share of every constrained decode step. When the step after this one is
already launched (async scheduling, engine/in_flight.py), its masks are filled ahead on a background
thread (`prefetch_bitmask`) as soon as the matchers have accepted this step's tokens, while the engine
thread emits and the text is made; llguidance releases the GIL while it fills. Each state remembers
the position its row was filled at, so a row sampled from elsewhere falls back to filling afresh;
nothing else touches a matcher while its row is being filled (`accept` and `fill_bitmask` wait for it
first).

The library is llguidance (imported only when a constraint is used). xgrammar served first; on the
same 64 rows of a JSON schema stepped with allowed tokens (benchmarks/grammar_masks.py), llguidance
filled the masks in 3.1 ms a step against 7.2 (bounded strings) and 2.3 against 3.8 (unbounded) on
the GPU machine's CPU at 4 threads, 3.5 against 8.5 and 1.2 against 2.2 on two cores, before rows
were spread over lanes (grammar_cache.py: 1.4 ms bounded at 4 threads there). The mask is the host's
share of every constrained decode step, which the GPU's forward must hide.
"""
from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ondo.sample.validation import SamplingParamsError

# JSON is compiled without free whitespace (separators ", " and ": "): a small model given the
# freedom to indent may emit newlines forever instead of closing the object.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# A grammar still compiling after this long fails its request instead of holding up the batch.
COMPILE_TIMEOUT_S = 60.0
# Threads filling a batch's masks. On the 16-core GPU machine, 64 rows of a bounded-string schema over
# 2x as many lanes (grammar_cache.py): 2.2 ms a step with 2 threads, 1.4 with 4, 1.3-1.5 with 8 or 12,
# which only take cores from the engine's own thread.
MASK_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
# llguidance echoes the grammar's source under its message ("   1 | start: ..."): the reason ends there.
_SOURCE_ECHO = re.compile(r"\n\s*\d+ \|")
# ...and starts it with a place in the grammar it generated, which the user never wrote.
_GENERATED_PLACE = re.compile(r'^at \d+\(\d+\): (invalid regex ".*?" \(in [^)]*\): )?', re.S)
_REGEX_SPECIAL = re.compile(r"([\\.+*?()|\[\]{}^$])")


class StructuredOutputError(SamplingParamsError):
    """A constraint is invalid (`field` names it, e.g. "json") or cannot be followed."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class StructuredOutputsParams:
    """The constraint of one request: exactly one field is set.

    json: a JSON schema (a dict or its JSON text); regex: a regular expression the whole output
    matches (Rust `regex` syntax, as Python's without look-around); choice: the output is exactly one
    of these strings; grammar: an EBNF grammar in GBNF form (rule `root`, as llama.cpp and xgrammar
    write it), or a Lark grammar (rule `start`, llguidance's own); json_object: any JSON object."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise StructuredOutputError(
                f"structured_outputs must set exactly one of {', '.join(_KINDS)}, got "
                f"{', '.join(given) if given else 'none'}", given[1] if len(given) > 1 else None)
        if self.json is not None:
            object.__setattr__(self, "json", _as_schema(self.json))
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise StructuredOutputError(f"structured_outputs.regex must be a non-empty string, got {self.regex!r}",
                                        "regex")
        if self.choice is not None:
            object.__setattr__(self, "choice", _as_choices(self.choice))
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise StructuredOutputError(
                f"structured_outputs.grammar must be a non-empty EBNF string, got {self.grammar!r}", "grammar")
        if self.json_object is not None and self.json_object is not True:
            raise StructuredOutputError(f"structured_outputs.json_object must be true, got {self.json_object!r}",
                                        "json_object")
        self.check_parses()

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def source(self) -> str:
        """The constraint as one text (its cache key together with `kind`): the schema's JSON
        keeps the property order, which is the order the fields are generated in."""
        if self.json is not None:
            return json.dumps(self.json, ensure_ascii=False)
        if self.json_object:
            return '{"type": "object"}'
        if self.choice is not None:
            return "|".join(_REGEX_SPECIAL.sub(r"\\\1", c) for c in self.choice)   # a regex of the literals
        return self.regex if self.regex is not None else self.grammar

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.source

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar (its JSON or Lark text)."""
        import llguidance as llg

        kind, source = self.key
        if kind in ("json", "json_object"):
            schema = _without_extra_properties(json.loads(source))
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if kind in ("regex", "choice"):
            return llg.LLMatcher.grammar_from_regex(source)
        if "::=" in source:   # GBNF
            from llguidance.gbnf_to_lark import gbnf_to_lark

            return gbnf_to_lark(source)
        return source

    def check_parses(self) -> None:
        """Parse the constraint (no vocabulary needed, about a millisecond) so that a bad schema,
        regex or grammar is reported now, naming the field and llguidance's reason."""
        import llguidance as llg

        try:
            problem = llg.LLMatcher.validate_grammar(self.grammar_text())
        except Exception as error:  # noqa: BLE001 -- the GBNF converter and the schema reader raise plain errors
            problem = str(error) or type(error).__name__
        if problem:
            kind = self.kind
            what = {"json": "is not a usable JSON schema", "regex": "is not a valid regex",
                    "grammar": "is not a valid grammar", "choice": "cannot be compiled",
                    "json_object": "cannot be compiled"}[kind]
            raise StructuredOutputError(f"structured_outputs.{kind} {what}: {clean_error(problem)}", kind)


def _without_extra_properties(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties and
    does not say otherwise: JSON Schema would allow extra keys there, which a small model then
    invents forever; OpenAI's strict mode and vLLM's other backend forbid them too."""
    if isinstance(schema, list):
        return [_without_extra_properties(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _without_extra_properties(value) for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict) and schema.get("type", "object") == "object":
        out.setdefault("additionalProperties", False)
    return out


def clean_error(error: BaseException | str) -> str:
    """llguidance's message on one line, without the grammar source it echoes."""
    text = _GENERATED_PLACE.sub("", _SOURCE_ECHO.split(str(error).strip(), maxsplit=1)[0])
    return " ".join(text.split()) or type(error).__name__


def as_structured_outputs(value: Any) -> StructuredOutputsParams | None:
    """SamplingParams.structured_outputs: None, a StructuredOutputsParams, or a dict of its fields."""
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(_KINDS))
        if unknown:
            raise StructuredOutputError(f"structured_outputs has no field {unknown[0]!r}; "
                                        f"use one of {', '.join(_KINDS)}", unknown[0])
        return StructuredOutputsParams(**value)
    raise SamplingParamsError(f"structured_outputs must be a StructuredOutputsParams or a dict, "
                              f"got {type(value).__name__}")


def _as_schema(value: Any) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise StructuredOutputError(f"structured_outputs.json must be a JSON schema, but its text is not "
                                        f"JSON: {error}", "json") from None
    if not isinstance(value, dict):
        raise StructuredOutputError(f"structured_outputs.json must be a JSON schema object, got "
                                    f"{type(value).__name__}", "json")
    return value


def _as_choices(value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise StructuredOutputError(f"structured_outputs.choice must be a non-empty list of strings, got {value!r}",
                                    "choice")
    for item in value:
        if not isinstance(item, str) or not item:
            raise StructuredOutputError(f"structured_outputs.choice must hold non-empty strings, got {item!r}",
                                        "choice")
    return list(value)


# ---- per sequence: the matcher ------------------------------------------------------------------


class GrammarState:
    """One sequence's position in its grammar; its matcher is copied from the compiled grammar at
    the first bitmask."""

    def __init__(self, compiled: Future, stop_token_ids: list[int], first_lane: Future | None = None) -> None:
        # Future of one of the constraint's compiled llguidance LLMatchers (its lane, grammar_cache.py),
        # never advanced itself: this state's matcher is a copy sharing its lexer. A lane still
        # compiling when the matcher is first needed gives way to the first lane, which the add-time
        # check compiled: a slow grammar is never compiled again on the engine's time.
        self.lane = compiled
        self._first_lane = first_lane or compiled
        self._stop_token_ids = frozenset(stop_token_ids)
        self._matcher = None
        self._terminated = False
        self.num_accepted = 0
        # (Future of a bitmask being filled in the background, this state's row in it, num_accepted then)
        self._prefetched: tuple[Future, int, int] | None = None

    @property
    def matcher(self):
        if self._matcher is None:
            if not (self.lane.done() and self.lane.exception() is None):
                self.lane = self._first_lane
            try:
                compiled = self.lane.result(timeout=COMPILE_TIMEOUT_S)
            except TimeoutError:
                raise StructuredOutputError(f"the grammar took more than {COMPILE_TIMEOUT_S:.0f} s to compile") from None
            except Exception as error:  # noqa: BLE001 -- reported as this request's failure
                raise StructuredOutputError(f"the grammar could not be compiled: {clean_error(error)}") from None
            self._matcher = compiled.deep_copy()
        return self._matcher

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token. The mask allowed only tokens the matcher accepts, but
        llguidance 1.9.1 can refuse one that its own mask allowed: a regex forcing a character the
        vocabulary writes only byte by byte (U+B1300 after U+00AD, found by the schema fuzzer). The
        request then fails alone, as one whose constraint cannot be followed; it never goes on
        unconstrained."""
        self.take_prefetched()   # its row is stale after this token; the fill must be done first
        if not self.matcher.consume_token(token_id):
            raise StructuredOutputError(f"structured output: this constraint could not be followed: the grammar "
                                        f"refused token {token_id} after {self.num_accepted} tokens "
                                        f"({clean_error(self.matcher.get_error())})")
        self.num_accepted += 1
        self._terminated = token_id in self._stop_token_ids

    @property
    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was accepted."""
        return self._terminated

    def take_prefetched(self) -> tuple[torch.Tensor, int] | None:
        """(bitmask, row): this state's row filled by `prefetch_bitmask` at its current position, or None
        (none asked for, a token accepted since, or the fill failed: a fresh fill reports why).
        Waits for a fill still running, which is then forgotten either way."""
        if self._prefetched is None:
            return None
        future, row, position = self._prefetched
        self._prefetched = None
        wait([future])
        if position != self.num_accepted or future.exception() is not None:
            return None
        return future.result(), row


_executor = None
_executor_lock = threading.Lock()
_prefetcher: ThreadPoolExecutor | None = None


def fill_bitmask(states: list[GrammarState], vocab_size: int) -> torch.Tensor:
    """Host int32 `[len(states), ceil(vocab / 32)]`: bit t of row i set = token t allowed for row i.
    The rows `prefetch_bitmask` filled for these states where they stand now, else filled here."""
    prefetched = [state.take_prefetched() for state in states]
    if all(item is not None for item in prefetched):
        bitmask = prefetched[0][0]
        if bitmask.shape[0] == len(states) and all(
                mask is bitmask and row == i for i, (mask, row) in enumerate(prefetched)):
            return bitmask   # the states, in the order they were prefetched in
        return torch.stack([mask[row] for mask, row in prefetched])
    return _fill(states, vocab_size)


def prefetch_bitmask(states: list[GrammarState], vocab_size: int, pinned: bool = False) -> None:
    """Start filling these states' rows on a background thread; `fill_bitmask` takes them once
    the states are sampled from where they stand now. pinned: fill page-locked memory, which the
    sampler copies to a GPU as it is (torch's caching pinned allocator keeps it until copied)."""
    global _prefetcher
    if not states:
        return
    try:
        for state in states:
            state.take_prefetched()
            state.matcher   # copied from the compiled grammar here, not on the filling thread
    except StructuredOutputError:
        return   # the fresh fill at sampling time fails the request and says why
    if _prefetcher is None:
        _prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ondo-masks")
    # Allocated here, on the engine thread, as the GPU runs showed it; filled on the prefetching thread.
    out = torch.empty(len(states), (vocab_size + 31) // 32, dtype=torch.int32, pin_memory=pinned)
    future = _prefetcher.submit(_fill, list(states), vocab_size, out)
    for row, state in enumerate(states):
        state._prefetched = (future, row, state.num_accepted)


def _fill(states: list[GrammarState], vocab_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """fill_bitmask's work, into `out` when given: several rows are filled by llguidance's thread pool."""
    import llguidance as llg

    global _executor
    if any(state.is_terminated for state in states):
        raise StructuredOutputError("the grammar is already complete: nothing more may be generated")
    matchers = [state.matcher for state in states]
    # llguidance writes every word of each row in place (what its llguidance.torch helpers do; that
    # module would import torch's compiler for a kernel ondo does not use), so nothing is zeroed.
    bitmask = torch.empty(len(states), (vocab_size + 31) // 32, dtype=torch.int32) if out is None else out
    row_bytes = bitmask.shape[1] * 4
    if len(matchers) == 1:
        matchers[0].unsafe_compute_mask_ptr(bitmask.data_ptr(), row_bytes)
    else:
        # Rows grouped by lane (grammar_cache.py): the pool's threads take contiguous runs of the
        # list, so each mostly holds one lane's lexer instead of queueing for another's.
        order = sorted(range(len(states)), key=lambda i: id(states[i].lane))
        with _executor_lock:   # the engine thread and the prefetching thread share one pool
            if _executor is None:
                _executor = llg.LLExecutor(num_threads=MASK_THREADS)
            _executor.unsafe_compute_mask_ptr([(matchers[i], i) for i in order], bitmask.data_ptr(),
                                              row_bytes, len(matchers))
    errors = [m.get_error() for m in matchers if m.is_error()]
    # NoExtensionBias: no token of the vocabulary continues the output. A row with no way forward
    # fails its request, never samples unconstrained.
    if any(e.startswith("NoExtensionBias") for e in errors) or not bitmask.numpy().any(axis=1).all():
        raise StructuredOutputError("structured output: the grammar allows no token here: this model's "
                                    "vocabulary cannot write what it asks for")
    if errors:
        raise StructuredOutputError(f"structured output failed: {clean_error(errors[0])}")
    return bitmask


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}
_NEG_INF = torch.tensor(float("-inf"))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf at every token whose bit is 0. logits `[rows, vocab]`, bitmask `[rows, words]` int32 on
    the logits' device (fill_bitmask has checked that each row allows some token). Returns a new
    tensor: the raw logits are still needed for log-probs. A few kernels on a GPU."""
    rows, vocab_size = logits.shape
    if logits.device.type == "cpu":   # numpy unpacks the bits in a fraction of the shifts' time
        allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab_size, bitorder="little")
        return torch.where(torch.from_numpy(allowed).bool(), logits, _NEG_INF)
    shifts = _BIT_SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool()  # [rows, words, 32]
    allowed = allowed.view(rows, -1)[:, :vocab_size]  # [rows, vocab]
    return logits.masked_fill(~allowed, float("-inf"))
