"""SamplingParams: validation messages, transformers spellings, GenerationConfig import and the
helpers the engine calls."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig

from ondo.sampling_params import SamplingParams, SamplingParamsError


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_k=0), "top_k must be -1 (off) or >= 1, got 0"),
    (dict(n=3, best_of=2), "n must be <= best_of, got n=3, best_of=2"),
    (dict(min_tokens=5, max_tokens=3), "min_tokens (5) must be <= max_tokens (3)"),
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(top_p="abc"), "top_p must be a number, got 'abc' (str)"),
    (dict(min_p=float("nan")), "min_p must be in [0, 1], got nan"),
    (dict(presence_penalty=3), "presence_penalty must be in [-2, 2], got 3.0"),
    (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
    (dict(logprobs=-1), "logprobs must be >= 0, got -1"),
    (dict(stop=[""]), "stop must not hold an empty string, got ['']"),
    (dict(logit_bias={5: 200}), "logit_bias[5] must be in [-100, 100], got 200.0"),
    (dict(allowed_token_ids=[]), "allowed_token_ids must not be empty, got []"),
    (dict(num_beams=4), "num_beams must be 1: beam search is not supported, got 4"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(**kwargs)
    assert str(error.value) == message
    assert isinstance(error.value, ValueError)  # the server answers ValueError with HTTP 400


def test_defaults_follow_vllm_and_lists_are_normalised():
    p = SamplingParams(stop="###", stop_token_ids=(7,), logit_bias={"11": -3})
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.max_tokens) == (1, 1, 1.0, 1.0, -1, 16)
    assert p.stop == ["###"] and p.stop_token_ids == [7] and p.logit_bias == {11: -3.0}
    assert p.bad_words == [] and p.allowed_token_ids is None and not p.greedy


def test_transformers_spellings():
    p = SamplingParams(max_new_tokens=40, min_new_tokens=2, num_return_sequences=3,
                       stop_strings=["\n"], do_sample=True, num_beams=1)
    assert (p.max_tokens, p.min_tokens, p.n, p.stop) == (40, 2, 3, ["\n"])
    with pytest.raises(SamplingParamsError, match="give max_tokens or max_new_tokens, not both"):
        SamplingParams(max_tokens=10, max_new_tokens=20)


def test_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(do_sample=False, temperature=0.7).greedy
    assert not SamplingParams(do_sample=True).greedy
    with pytest.raises(SamplingParamsError, match="best_of must be 1 when sampling greedily"):
        SamplingParams(temperature=0, n=2)
    with pytest.raises(SamplingParamsError, match="temperature must be > 0 when do_sample=True"):
        SamplingParams(do_sample=True, temperature=0)


def test_frozen_and_replace_revalidates():
    p = SamplingParams(top_k=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_k = 3
    assert dataclasses.replace(p, top_p=0.5).top_k == 5
    with pytest.raises(SamplingParamsError, match="top_p"):
        dataclasses.replace(p, top_p=0)


def test_resolve_max_tokens():
    assert SamplingParams(max_tokens=16).resolve_max_tokens(10, 100) == 16
    assert SamplingParams(max_tokens=16).resolve_max_tokens(90, 100) == 10  # the context is full
    assert SamplingParams(max_tokens=None).resolve_max_tokens(10, 100) == 90
    assert SamplingParams(max_tokens=None, max_length=30).resolve_max_tokens(10, 100) == 20
    assert SamplingParams(max_tokens=5, max_length=30).resolve_max_tokens(10, 100) == 5
    with pytest.raises(SamplingParamsError, match="max_length counts the prompt"):
        SamplingParams(max_length=8).resolve_max_tokens(10, 100)
    with pytest.raises(SamplingParamsError, match="no room left"):
        SamplingParams().resolve_max_tokens(100, 100)


def test_resolve_min_tokens():
    assert SamplingParams(min_tokens=3).resolve_min_tokens(10) == 3
    assert SamplingParams(min_length=15).resolve_min_tokens(10) == 5
    assert SamplingParams(min_length=5, min_tokens=2).resolve_min_tokens(10) == 2


class CharTokenizer:
    """One token per character: ord(c). Enough to see both spellings of a bad word."""

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return [ord(c) for c in text]


def test_bad_words_token_ids_adds_the_leading_space_variant_and_ids():
    p = SamplingParams(bad_words=["ab", " ab"], bad_words_ids=[[1, 2], [ord("a"), ord("b")]])
    assert p.bad_words_token_ids(CharTokenizer()) == [[97, 98], [32, 97, 98], [1, 2]]


def test_check_token_ids_against_the_vocabulary():
    SamplingParams(stop_token_ids=[9], logprobs=10).check_token_ids(10)
    with pytest.raises(SamplingParamsError, match=r"allowed_token_ids must hold token ids in \[0, 10\), got 12"):
        SamplingParams(allowed_token_ids=[1, 12]).check_token_ids(10)


def test_from_generation_config():
    cfg = GenerationConfig(do_sample=True, temperature=0.6, top_k=0, top_p=0.9, max_length=64,
                           repetition_penalty=1.1, suppress_tokens=[5], sequence_bias=[[[7], 2.0]])
    p = SamplingParams.from_generation_config(cfg)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.6, -1, 0.9, 1.1)
    assert (p.max_tokens, p.max_length) == (None, 64)
    assert p.bad_words_ids == [[5]] and p.logit_bias == {7: 2.0}
    # An explicit length replaces the config's; max_new_tokens wins over max_length as in transformers.
    assert SamplingParams.from_generation_config(cfg, max_new_tokens=5).max_length is None
    both = SamplingParams.from_generation_config({"max_length": 64, "max_new_tokens": 8})
    assert (both.max_tokens, both.max_length) == (8, None)
    greedy = SamplingParams.from_generation_config(GenerationConfig(do_sample=False), top_p=0.5)
    assert greedy.greedy and greedy.top_p == 0.5
    with pytest.raises(SamplingParamsError, match="num_beams"):
        SamplingParams.from_generation_config(GenerationConfig(num_beams=4))
    with pytest.raises(SamplingParamsError, match="penalty_alpha is not supported"):
        SamplingParams.from_generation_config({"penalty_alpha": 0.6, "top_k": 4})


@st.composite
def valid_params(draw):
    temperature = draw(st.sampled_from([0.0, 0.3, 1.0]) | st.floats(1e-4, 5))
    do_sample = draw(st.sampled_from([None, True, False])) if temperature > 0 else None
    greedy = do_sample is False or temperature < 1e-5
    n = 1 if greedy else draw(st.integers(1, 4))
    max_tokens = draw(st.none() | st.integers(1, 4096))
    max_length = draw(st.none() | st.integers(1, 4096))
    return dict(
        n=n, best_of=None if greedy else draw(st.none() | st.integers(n, 8)),
        temperature=temperature, do_sample=do_sample,
        top_p=draw(st.floats(0, 1, exclude_min=True)), top_k=draw(st.sampled_from([-1, 1, 40])),
        min_p=draw(st.floats(0, 1)), typical_p=draw(st.floats(0, 1, exclude_min=True)),
        presence_penalty=draw(st.floats(-2, 2)), frequency_penalty=draw(st.floats(-2, 2)),
        repetition_penalty=draw(st.floats(0.01, 10)), seed=draw(st.none() | st.integers(0, 2**63)),
        stop=draw(st.none() | st.text(min_size=1) | st.lists(st.text(min_size=1), max_size=3)),
        stop_token_ids=draw(st.lists(st.integers(0, 10**6), max_size=3)),
        logit_bias=draw(st.dictionaries(st.integers(0, 10**6), st.floats(-100, 100), max_size=3)),
        max_tokens=max_tokens, min_tokens=draw(st.integers(0, max_tokens or 100)),
        max_length=max_length, min_length=draw(st.none() | st.integers(0, max_length or 100)),
        logprobs=draw(st.none() | st.integers(0, 20)),
        no_repeat_ngram_size=draw(st.integers(0, 5)),
    )


@settings(max_examples=150, deadline=None)
@given(valid_params())
def test_valid_params_construct(kwargs):
    p = SamplingParams(**kwargs)
    assert p.best_of >= p.n >= 1
    assert isinstance(p.stop, list)


# For each field: values that are wrong in range or in type.
INVALID = {
    "n": st.integers(max_value=0) | st.just("2") | st.just(1.5),
    "best_of": st.integers(max_value=0) | st.just([1]),
    "temperature": st.floats(max_value=-1e-9) | st.just(float("inf")) | st.just("hot"),
    "top_p": st.floats(min_value=1.0, exclude_min=True) | st.floats(max_value=0.0) | st.just(float("nan")),
    "top_k": st.integers(max_value=-2) | st.just(0) | st.just(2.5) | st.just(None),
    "min_p": st.floats(min_value=1.0, exclude_min=True) | st.floats(max_value=0.0, exclude_max=True),
    "typical_p": st.floats(min_value=1.0, exclude_min=True) | st.just(0.0),
    "presence_penalty": st.floats(min_value=2.0, exclude_min=True) | st.just(True),
    "frequency_penalty": st.floats(max_value=-2.0, exclude_max=True) | st.just({}),
    "repetition_penalty": st.floats(max_value=0.0) | st.just(None),
    "seed": st.integers(min_value=2**64) | st.just(1.5) | st.just("7"),
    "stop": st.just([""]) | st.lists(st.integers(), min_size=1) | st.just(5),
    "stop_token_ids": st.lists(st.integers(max_value=-1), min_size=1) | st.just("1,2"),
    "bad_words_ids": st.just([[]]) | st.just([1, 2]) | st.just([["a"]]),
    "logit_bias": st.dictionaries(st.integers(0, 9), st.floats(min_value=100, exclude_min=True),
                                  min_size=1) | st.just([1]) | st.just({"x": 1}),
    "allowed_token_ids": st.just([]) | st.just([-1]) | st.just("5"),
    "no_repeat_ngram_size": st.integers(max_value=-1) | st.just("3"),
    "max_tokens": st.integers(max_value=0) | st.just("16"),
    "min_tokens": st.integers(max_value=-1) | st.integers(min_value=17),
    "max_length": st.integers(max_value=0) | st.just([]),
    "logprobs": st.integers(max_value=-1) | st.just(2.5),
    "ignore_eos": st.just(1) | st.just("yes") | st.just(None),
    "logits_processors": st.just([1]) | st.just(len),
    "do_sample": st.just("false") | st.just(0),
    "truncate_prompt_tokens": st.integers(max_value=0),
    "max_new_tokens": st.integers(max_value=0) | st.just("8"),
    "num_return_sequences": st.integers(max_value=0),
    "stop_strings": st.just([""]) | st.just([3]),
}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(INVALID)).flatmap(lambda f: st.tuples(st.just(f), INVALID[f])))
def test_invalid_values_name_the_field(case):
    field, value = case
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(**{field: value})
    assert field in str(error.value)


ANYTHING = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
            | st.lists(st.integers(-3, 3), max_size=3) | st.dictionaries(st.text(max_size=2), st.integers()))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([f.name for f in dataclasses.fields(SamplingParams)]
                       + ["max_new_tokens", "min_new_tokens", "num_return_sequences", "num_beams",
                          "stop_strings"]), ANYTHING)
def test_any_value_either_constructs_or_raises_sampling_params_error(field, value):
    try:
        SamplingParams(**{field: value})
    except SamplingParamsError as error:
        assert field in str(error) or "best_of" in str(error) or "max_tokens" in str(error)
