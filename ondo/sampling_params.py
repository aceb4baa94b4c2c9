"""Decoding options of one request, validated when built.

`SamplingParams` speaks vLLM's field names and defaults and also accepts transformers' spellings
(`max_new_tokens`, `min_new_tokens`, `num_return_sequences`, `do_sample`, `bad_words_ids`,
`stop_strings`) so code written for either library runs unchanged. Every value is checked at
construction; a bad one raises `SamplingParamsError` (a `ValueError`, which the server answers
with HTTP 400) whose message names the field, the allowed range and the value given.

The object is frozen: one `SamplingParams` is shared by the `n` sequences of a request and by
the engine's bookkeeping, so nobody may change it under their feet. Use `dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field, fields
from typing import Any, Callable, Mapping

from ondo.sample.generation_config import generation_config_kwargs
from ondo.sample.structured import StructuredOutputsParams, as_structured_outputs
from ondo.sample.validation import (
    SamplingParamsError,
    as_bool,
    as_int,
    as_int_list,
    as_number,
    as_str_list,
)

__all__ = ["SamplingParams", "SamplingParamsError", "StructuredOutputsParams", "LogitsProcessorFn"]

# (output token ids so far, logits [vocab]) -> new logits [vocab]; vLLM's per-request processor.
LogitsProcessorFn = Callable[[list, Any], Any]

# Below this temperature dividing the logits overflows float32; such requests sample greedily
# (vLLM draws the same line).
GREEDY_TEMPERATURE = 1e-5
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32, the logits' precision


@dataclass(frozen=True)
class SamplingParams:
    """Every decoding option of one request. Field names and defaults follow vLLM."""

    n: int = 1  # sequences returned
    best_of: int | None = None  # sequences generated, the n most likely returned; None = n
    presence_penalty: float = 0.0  # OpenAI form, output tokens only, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI form, output tokens only, in [-2, 2]
    repetition_penalty: float = 1.0  # transformers' multiplicative form, prompt + output tokens
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = -1  # -1 = off
    min_p: float = 0.0  # drop tokens with p < min_p * p_max
    typical_p: float = 1.0  # locally typical sampling mass, in (0, 1]
    epsilon_cutoff: float = 0.0  # transformers: drop tokens with p < epsilon, in [0, 1)
    eta_cutoff: float = 0.0  # transformers: entropy-dependent cutoff, in [0, 1)
    seed: int | None = None  # per-request generator: same seed, same tokens, whatever the batch
    stop: list[str] = field(default_factory=list)  # str | list[str] accepted
    stop_token_ids: list[int] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)  # banned as whole token sequences
    bad_words_ids: list[list[int]] = field(default_factory=list)  # transformers' banned sequences
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    no_repeat_ngram_size: int = 0  # 0 = off
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = until the context is full; 0 = score the prompt only
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens exist
    max_length: int | None = None  # transformers: prompt + output tokens
    min_length: int | None = None  # transformers: prompt + output tokens
    logprobs: int | None = None  # k: return the chosen token's and the top-k log-probs
    prompt_logprobs: int | None = None  # k: log-probs of every prompt token and the top-k
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    logits_processors: list[LogitsProcessorFn] = field(default_factory=list)
    do_sample: bool | None = None  # transformers: False = greedy; None = decided by temperature
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens
    # JSON schema / regex / choice / EBNF the output must follow (a dict of its fields is accepted).
    structured_outputs: StructuredOutputsParams | None = None
    # transformers' spellings, folded into the fields above by __post_init__.
    max_new_tokens: InitVar[int | None] = None
    min_new_tokens: InitVar[int | None] = None
    num_return_sequences: InitVar[int | None] = None
    num_beams: InitVar[int | None] = None
    stop_strings: InitVar[str | list[str] | None] = None

    def __post_init__(self, max_new_tokens, min_new_tokens, num_return_sequences, num_beams,
                      stop_strings) -> None:
        if num_beams is not None and as_int("num_beams", num_beams) != 1:
            raise SamplingParamsError(
                f"num_beams must be 1: beam search is not supported, got {num_beams!r}")
        # Checked under their own names first, so that an error names what the caller wrote.
        if max_new_tokens is not None:
            max_new_tokens = as_int("max_new_tokens", max_new_tokens, ge=1)
        if min_new_tokens is not None:
            min_new_tokens = as_int("min_new_tokens", min_new_tokens, ge=0)
        if num_return_sequences is not None:
            num_return_sequences = as_int("num_return_sequences", num_return_sequences, ge=1)
        if stop_strings is not None:
            stop_strings = as_str_list("stop_strings", stop_strings)
        self._set("max_tokens", _alias("max_tokens", self.max_tokens, 16,
                                       "max_new_tokens", max_new_tokens))
        self._set("min_tokens", _alias("min_tokens", self.min_tokens, 0,
                                       "min_new_tokens", min_new_tokens))
        self._set("n", _alias("n", self.n, 1, "num_return_sequences", num_return_sequences))
        self._set("stop", _alias("stop", self.stop, [], "stop_strings", stop_strings))
        self._validate_and_normalise()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # the dataclass is frozen; only construction writes

    def _validate_and_normalise(self) -> None:
        s = self._set
        s("n", as_int("n", self.n, ge=1))
        s("best_of", self.n if self.best_of is None else as_int("best_of", self.best_of, ge=1))
        if self.n > self.best_of:
            raise SamplingParamsError(f"n must be <= best_of, got n={self.n}, best_of={self.best_of}")
        s("presence_penalty", as_number("presence_penalty", self.presence_penalty, ge=-2, le=2))
        s("frequency_penalty", as_number("frequency_penalty", self.frequency_penalty, ge=-2, le=2))
        s("repetition_penalty", as_number("repetition_penalty", self.repetition_penalty, gt=0))
        if self.repetition_penalty < FLOAT32_TINY:   # 0 in float32: it would divide the logits by zero
            raise SamplingParamsError(f"repetition_penalty must be >= {FLOAT32_TINY:.4g} (the smallest float32), "
                                      f"got {self.repetition_penalty!r}")
        s("temperature", as_number("temperature", self.temperature, ge=0))
        s("top_p", as_number("top_p", self.top_p, gt=0, le=1))
        s("top_k", as_int("top_k", self.top_k))
        if self.top_k != -1 and self.top_k < 1:
            raise SamplingParamsError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        s("min_p", as_number("min_p", self.min_p, ge=0, le=1))
        s("typical_p", as_number("typical_p", self.typical_p, gt=0, le=1))
        s("epsilon_cutoff", as_number("epsilon_cutoff", self.epsilon_cutoff, ge=0, lt=1))
        s("eta_cutoff", as_number("eta_cutoff", self.eta_cutoff, ge=0, lt=1))
        if self.seed is not None:
            # torch.Generator.manual_seed accepts exactly this range.
            s("seed", as_int("seed", self.seed, ge=-(2**63), le=2**64 - 1))
        s("stop", as_str_list("stop", self.stop))
        s("stop_token_ids", as_int_list("stop_token_ids", self.stop_token_ids, ge=0))
        s("bad_words", as_str_list("bad_words", self.bad_words))
        s("bad_words_ids", _as_token_sequences("bad_words_ids", self.bad_words_ids))
        s("logit_bias", _as_logit_bias(self.logit_bias))
        if self.allowed_token_ids is not None:
            s("allowed_token_ids", as_int_list("allowed_token_ids", self.allowed_token_ids, ge=0))
            if not self.allowed_token_ids:
                raise SamplingParamsError("allowed_token_ids must not be empty, got []")
        s("no_repeat_ngram_size", as_int("no_repeat_ngram_size", self.no_repeat_ngram_size, ge=0))
        for flag in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens", "detokenize"):
            s(flag, as_bool(flag, getattr(self, flag)))
        # 0 computes the prompt and samples nothing (scoring); checked once prompt_logprobs is.
        if self.max_tokens is not None and not _is_zero_int(self.max_tokens):
            s("max_tokens", as_int("max_tokens", self.max_tokens, ge=1))
        s("min_tokens", as_int("min_tokens", self.min_tokens, ge=0))
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.max_length is not None:
            s("max_length", as_int("max_length", self.max_length, ge=1))
        if self.min_length is not None:
            s("min_length", as_int("min_length", self.min_length, ge=0))
        if (self.min_length is not None and self.max_length is not None
                and self.min_length > self.max_length):
            raise SamplingParamsError(
                f"min_length ({self.min_length}) must be <= max_length ({self.max_length})")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                s(name, as_int(name, getattr(self, name), ge=0))
        if self.max_tokens == 0 and self.prompt_logprobs is None:   # 0 is for scoring prompts only
            raise SamplingParamsError("max_tokens must be >= 1, got 0")
        if self.truncate_prompt_tokens is not None:
            s("truncate_prompt_tokens", as_int("truncate_prompt_tokens",
                                               self.truncate_prompt_tokens, ge=1))
        s("logits_processors", _as_processors(self.logits_processors))
        s("structured_outputs", as_structured_outputs(self.structured_outputs))
        if self.do_sample is not None:
            s("do_sample", as_bool("do_sample", self.do_sample))
            if self.do_sample and self.temperature == 0:
                raise SamplingParamsError(
                    "temperature must be > 0 when do_sample=True, got 0.0")
        if self.greedy and self.best_of > 1:
            raise SamplingParamsError(
                f"best_of must be 1 when sampling greedily (temperature=0 or do_sample=False): "
                f"every sequence would be the same, got n={self.n}, best_of={self.best_of}")

    # ---- what the engine and the sampler ask ---------------------------------------------------

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken (temperature ~ 0 or do_sample=False)."""
        return self.do_sample is False or self.temperature < GREEDY_TEMPERATURE

    def resolve_max_tokens(self, prompt_len: int, max_model_len: int) -> int:
        """How many tokens to generate at most: the tightest of max_tokens, max_length (which
        counts the prompt) and the room left in the context."""
        room = max_model_len - prompt_len
        if room < 1:
            raise SamplingParamsError(
                f"the prompt has {prompt_len} tokens and the context holds {max_model_len}: "
                f"no room left to generate")
        limit = room
        if self.max_tokens is not None:
            limit = min(limit, self.max_tokens)
        if self.max_length is not None:
            if self.max_length <= prompt_len:
                raise SamplingParamsError(
                    f"max_length counts the prompt and must be > the prompt length "
                    f"({prompt_len}), got {self.max_length}")
            limit = min(limit, self.max_length - prompt_len)
        return limit

    def resolve_min_tokens(self, prompt_len: int) -> int:
        """How many tokens to generate before EOS and stop_token_ids may be sampled:
        the larger of min_tokens and min_length (which counts the prompt) minus the prompt."""
        from_length = 0 if self.min_length is None else max(0, self.min_length - prompt_len)
        return max(self.min_tokens, from_length)

    def bad_words_token_ids(self, tokenizer: Any) -> list[list[int]]:
        """Token sequences to ban: each of `bad_words` encoded as it is and with a leading space
        (a word mid-text is usually a different token than at the start, as in vLLM),
        plus `bad_words_ids`. Duplicates and empty encodings are dropped."""
        sequences: dict[tuple[int, ...], None] = {}   # ordered and deduplicated in linear time
        for word in self.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    sequences.setdefault(ids)
        for ids in self.bad_words_ids:
            sequences.setdefault(tuple(ids))
        return [list(ids) for ids in sequences]

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise SamplingParamsError if a token id in these options is outside the vocabulary.
        Called by the engine when a request is added (the vocabulary is unknown here before)."""
        named = [("stop_token_ids", self.stop_token_ids),
                 ("logit_bias", list(self.logit_bias)),
                 ("allowed_token_ids", self.allowed_token_ids or []),
                 ("bad_words_ids", [t for seq in self.bad_words_ids for t in seq])]
        for name, ids in named:
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise SamplingParamsError(
                    f"{name} must hold token ids in [0, {vocab_size}), got {bad[0]}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and k > vocab_size:
                raise SamplingParamsError(f"{name} must be <= the vocabulary size "
                                          f"({vocab_size}), got {k}")

    # ---- construction from transformers ---------------------------------------------------------

    @classmethod
    def from_generation_config(cls, config: Any, **overrides: Any) -> "SamplingParams":
        """Build from a `transformers.GenerationConfig` (or its dict) plus explicit overrides.

        Only options the config sets explicitly are taken (transformers leaves the others None);
        overrides win over the config. As in transformers, max_new_tokens wins over max_length,
        and a length given in the overrides replaces both of the config's. Options that change
        the output and that ondo does not implement (beam search, ...) raise SamplingParamsError."""
        return cls(**generation_config_kwargs(config, overrides))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (logits_processors by name), e.g. for logs."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["logits_processors"] = [getattr(p, "__name__", repr(p)) for p in self.logits_processors]
        return out


def _is_zero_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value == 0


def _alias(name: str, value: Any, default: Any, alias: str, alias_value: Any) -> Any:
    """Fold a transformers spelling into its vLLM field; both given and different is an error."""
    if alias_value is None:
        return value
    if value is not None and value != default and value != alias_value:
        raise SamplingParamsError(
            f"give {name} or {alias}, not both: got {name}={value!r}, {alias}={alias_value!r}")
    return alias_value


def _as_token_sequences(name: str, value: Any) -> list[list[int]]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise SamplingParamsError(f"{name} must be a list of lists of token ids, got {value!r}")
    sequences = []
    for seq in value:
        ids = as_int_list(name, seq, ge=0)
        if not ids:
            raise SamplingParamsError(f"{name} must not hold an empty sequence, got {value!r}")
        sequences.append(ids)
    return sequences


def _as_logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SamplingParamsError(f"logit_bias must be a dict of token id -> bias, got {value!r}")
    bias = {}
    for key, val in value.items():
        # JSON objects have string keys: the OpenAI API sends {"50256": -100}.
        if isinstance(key, str):
            try:
                key = int(key)
            except ValueError:
                pass  # reported below as a non-integer token id
        token = as_int("logit_bias token id", key, ge=0)
        bias[token] = as_number(f"logit_bias[{token}]", val, ge=-100, le=100)
    return bias


def _as_processors(value: Any) -> list[LogitsProcessorFn]:
    if value is None:
        return []
    if callable(value) or not isinstance(value, (list, tuple)):
        raise SamplingParamsError(f"logits_processors must be a list of callables, got {value!r}")
    for proc in value:
        if not callable(proc):
            raise SamplingParamsError(f"logits_processors must hold callables, got {proc!r}")
    return list(value)
