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

xgrammar is imported only when a constraint is used.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from ondo.sample.validation import SamplingParamsError

# JSON is compiled without free whitespace (separators ", " and ": "): a small model given the
# freedom to indent may emit newlines forever instead of closing the object.
JSON_ANY_WHITESPACE = False
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# A grammar still compiling after this long fails its request instead of holding up the batch.
COMPILE_TIMEOUT_S = 60.0
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the rest is the reason.
_CPP_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")


class StructuredOutputError(SamplingParamsError):
    """A constraint is invalid (`field` names it, e.g. "json") or cannot be followed."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class StructuredOutputsParams:
    """The constraint of one request: exactly one field is set.

    json: a JSON schema (a dict or its JSON text); regex: a regular expression the whole output
    matches; choice: the output is exactly one of these strings; grammar: an EBNF grammar
    (xgrammar's dialect, GBNF-like, rule `root`); json_object: any JSON object."""

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
            return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
        return self.regex if self.regex is not None else self.grammar

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.source

    def check_parses(self) -> None:
        """Parse the constraint (no vocabulary needed, well under a millisecond) so that a bad
        schema, regex or grammar is reported now, naming the field and xgrammar's reason."""
        import xgrammar as xgr

        kind = self.kind
        try:
            if kind in ("json", "json_object"):
                xgr.Grammar.from_json_schema(self.source, any_whitespace=JSON_ANY_WHITESPACE)
            elif kind == "regex":
                xgr.Grammar.from_regex(self.source)
            else:
                xgr.Grammar.from_ebnf(self.source)
        except (RuntimeError, ValueError) as error:
            what = {"json": "is not a usable JSON schema", "regex": "is not a valid regex",
                    "grammar": "is not a valid EBNF grammar", "choice": "cannot be compiled",
                    "json_object": "cannot be compiled"}[kind]
            raise StructuredOutputError(f"structured_outputs.{kind} {what}: {clean_error(error)}", kind) from None


def clean_error(error: BaseException) -> str:
    """xgrammar's message without its C++ source location, on one line."""
    text = _CPP_PREFIX.sub("", str(error).strip())
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
    """One sequence's position in its grammar; its matcher is made from the compiled grammar at
    the first bitmask."""

    def __init__(self, compiled: Future, stop_token_ids: list[int]) -> None:
        self._compiled = compiled
        self._stop_token_ids = stop_token_ids
        self._matcher = None
        self.num_accepted = 0

    @property
    def matcher(self):
        if self._matcher is None:
            import xgrammar as xgr

            try:
                compiled = self._compiled.result(timeout=COMPILE_TIMEOUT_S)
            except TimeoutError:
                raise StructuredOutputError(f"the grammar took more than {COMPILE_TIMEOUT_S:.0f} s to compile") from None
            except Exception as error:  # noqa: BLE001 -- reported as this request's failure
                raise StructuredOutputError(f"the grammar could not be compiled: {clean_error(error)}") from None
            self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=self._stop_token_ids or None)
        return self._matcher

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token. The mask allowed only accepted tokens, so a refusal
        means the engine's state is broken: fail the request rather than go on unconstrained."""
        if not self.matcher.accept_token(token_id):
            raise StructuredOutputError(f"token {token_id} is not allowed by the request's grammar "
                                        f"(after {self.num_accepted} tokens)")
        self.num_accepted += 1

    @property
    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was accepted."""
        return self._matcher is not None and self._matcher.is_terminated()


_batch_matcher = None


def fill_bitmask(states: list[GrammarState], vocab_size: int) -> torch.Tensor:
    """Host int32 `[len(states), ceil(vocab / 32)]`: bit t of row i set = token t allowed for row i.
    Several rows are filled by xgrammar's thread pool (the host's share of a constrained step)."""
    import xgrammar as xgr

    global _batch_matcher
    bitmask = xgr.allocate_token_bitmask(len(states), vocab_size)  # [rows, words], all allowed
    if any(state.is_terminated for state in states):
        raise StructuredOutputError("the grammar is already complete: nothing more may be generated")
    matchers = [state.matcher for state in states]
    if len(matchers) == 1:
        matchers[0].fill_next_token_bitmask(bitmask, 0)
    else:
        if _batch_matcher is None:
            _batch_matcher = xgr.BatchGrammarMatcher(max_threads="auto")
        _batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask)
    if not bitmask.numpy().any(axis=1).all():  # a row with no way forward: fail, never sample unconstrained
        raise StructuredOutputError("structured output: the grammar allows no token here: this model's "
                                    "vocabulary cannot write what it asks for")
    return bitmask


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf at every token whose bit is 0. logits `[rows, vocab]`, bitmask `[rows, words]` int32 on
    the logits' device (fill_bitmask has checked that each row allows some token). Returns a new
    tensor: the raw logits are still needed for log-probs."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        import xgrammar as xgr

        masked = logits.clone()
        xgr.apply_token_bitmask_inplace(masked, bitmask)  # its C++ kernel: ~5x the unpacking below
        return masked
    return unpack_token_bitmask(logits, bitmask)


def unpack_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """apply_token_bitmask in plain tensor operations, for any device (a few kernels on a GPU)."""
    rows, vocab_size = logits.shape
    shifts = _BIT_SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool()  # [rows, words, 32]
    allowed = allowed.view(rows, -1)[:, :vocab_size]  # [rows, vocab]
    return logits.masked_fill(~allowed, float("-inf"))
