"""Structured output without a model: the constraint's validation, the bitmask, the grammar cache,
and the sampler never choosing a token the grammar forbids (whatever the other processors do)."""
from __future__ import annotations

import json

import pytest
import torch
from sample_fakes import request

from ondo import SamplingParams, SamplingParamsError
from ondo.sample import Sampler
from ondo.sample.grammar_cache import GrammarCache
from ondo.sample.structured import (StructuredOutputError, StructuredOutputsParams, apply_token_bitmask,
                                    fill_bitmask, prefetch_bitmask)

EOS = 2


@pytest.fixture(scope="module")
def grammars(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))
    cache = GrammarCache(hf, len(hf), [EOS], capacity=3)
    yield hf, cache
    cache.shutdown()


# ---- the constraint ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one of json, regex, choice, grammar, json_object, got none"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of json, regex, choice, grammar, json_object, got regex, choice"),
    ({"json": {"type": "foo"}}, "structured_outputs.json is not a usable JSON schema: Invalid type: foo"),
    ({"json": "{not json"}, "structured_outputs.json must be a JSON schema, but its text is not JSON"),
    ({"json": [1, 2]}, "structured_outputs.json must be a JSON schema object, got list"),
    ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "minimum (5) is greater than maximum (1)"),
    ({"json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}},
     "structured_outputs.json is not a usable JSON schema: Pointer '/$defs/missing' does not exist"),
    ({"regex": "[a-"}, "structured_outputs.regex is not a valid regex: regex parse error: [a- ^ error: unclosed "
                       "character class"),
    ({"regex": ""}, "structured_outputs.regex must be a non-empty string"),
    ({"choice": "yes"}, "structured_outputs.choice must be a non-empty list of strings, got 'yes'"),
    ({"choice": ["yes", ""]}, "structured_outputs.choice must hold non-empty strings, got ''"),
    ({"grammar": "root ::= foo"}, "structured_outputs.grammar is not a valid grammar: Rule 'foo' not found"),
    ({"grammar": "start: foo"}, 'structured_outputs.grammar is not a valid grammar: unknown name: "foo"'),
    ({"json_object": False}, "got none"),
])
def test_an_invalid_constraint_is_refused_naming_field_and_reason(kwargs, message):
    with pytest.raises(StructuredOutputError) as error:
        StructuredOutputsParams(**kwargs)
    assert message in str(error.value)
    assert isinstance(error.value, SamplingParamsError)   # the server answers it with a 400


def test_sampling_params_takes_the_constraint_or_a_dict_of_it():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    params = SamplingParams(structured_outputs={"json": json.dumps(schema)})
    assert params.structured_outputs == StructuredOutputsParams(json=schema)
    assert params.structured_outputs.key == ("json", json.dumps(schema))   # property order kept
    with pytest.raises(SamplingParamsError, match="structured_outputs has no field 'jsn'"):
        SamplingParams(structured_outputs={"jsn": {}})
    with pytest.raises(SamplingParamsError, match="structured_outputs must be a StructuredOutputsParams or a dict"):
        SamplingParams(structured_outputs="json")
    with pytest.raises(SamplingParamsError, match="not a valid regex"):
        SamplingParams(structured_outputs={"regex": "(ab"})


# ---- the bitmask ---------------------------------------------------------------------------------------


def test_bitmask_kernels_agree_with_the_definition():
    torch.manual_seed(0)
    rows, vocab = 5, 77   # a vocabulary that is not a multiple of 32
    allowed = torch.rand(rows, vocab) < 0.3
    allowed[:, 0] = True
    padded = torch.zeros(rows, 96, dtype=torch.bool)
    padded[:, :vocab] = allowed
    weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)
    bitmask = (padded.view(rows, 3, 32).long() * weights).sum(-1)
    bitmask = torch.where(bitmask >= 2**31, bitmask - 2**32, bitmask).to(torch.int32)  # [rows, 3]
    logits = torch.randn(rows, vocab)
    expected = torch.where(allowed, logits, torch.tensor(float("-inf")))
    assert torch.equal(apply_token_bitmask(logits, bitmask), expected)
    assert torch.isfinite(logits).all()   # the raw logits are left alone (log-probs read them)


# ---- the grammar cache ---------------------------------------------------------------------------------


def test_cache_compiles_once_per_constraint_and_evicts_least_recently_used(grammars):
    _, cache = grammars
    constraints = [StructuredOutputsParams(choice=[f"w{i}", "x"]) for i in range(4)]
    start_hits, start_misses = cache.hits, cache.misses
    first = cache.compile_now(constraints[0])
    assert cache.compile_now(constraints[0]) is first
    for constraint in constraints[1:]:
        cache.compile_now(constraint)
    assert (cache.hits - start_hits, cache.misses - start_misses) == (1, 4)
    assert len(cache) == 3   # capacity 3: the least recently used one went
    assert cache.compile_now(constraints[0]) is not first and cache.misses - start_misses == 5


def test_sequences_of_one_constraint_take_its_lanes_in_turn_and_each_row_gets_its_own_mask(grammars):
    """A matcher copied from a compiled one shares its lexer behind one lock, so the cache compiles a
    constraint into LANES matchers that its sequences take in turn; the batch fill, which groups the
    rows by lane, still writes each state's mask into that state's row."""
    from ondo.sample.grammar_cache import LANES

    hf, cache = grammars
    vocab = len(hf)
    schema = StructuredOutputsParams(json={"type": "object", "properties": {"n": {"type": "integer"},
                                                                            "s": {"type": "string"}}})
    cache.check(schema)   # takes no lane from the sequences
    states = [cache.new_state(schema) for _ in range(2 * LANES + 1)]
    cache.check(schema)
    lanes = [state.lane for state in states]
    assert len({id(lane) for lane in lanes}) == LANES and lanes[0] is lanes[LANES] is lanes[2 * LANES]
    assert cache.submit(schema) is lanes[0]
    for lane in lanes:
        lane.result()   # compiled (a lane still compiling would give way to the first one)
    # Rows at different places, interleaved across lanes.
    text_so_far = ['{"n": 1', '{"s": "ab', "", '{"n"', '{']
    for i, state in enumerate(states):
        for token in hf.encode(text_so_far[i % len(text_so_far)], add_special_tokens=False):
            state.accept(token)
    singles = torch.cat([fill_bitmask([state], vocab) for state in states])
    assert len({tuple(row.tolist()) for row in singles}) == len(text_so_far)
    assert torch.equal(fill_bitmask(states, vocab), singles)
    assert torch.equal(fill_bitmask(states[::-1], vocab), singles.flip(0))
    assert [state.lane for state in states] == lanes   # each filled on its own lane


def test_a_lane_still_compiling_gives_way_to_the_first_lane(grammars):
    """A slow grammar's extra lanes compile in the background; a sequence whose lane is not ready when
    its first mask is needed follows the first lane instead of waiting for it."""
    from concurrent.futures import Future

    from ondo.sample.structured import GrammarState

    hf, cache = grammars
    first = cache.submit(StructuredOutputsParams(regex="[ab]+"))
    still_compiling = Future()
    state = GrammarState(still_compiling, [EOS], first_lane=first)
    assert allowed_tokens(state_request(state), len(hf)) == allowed_tokens(state_request(
        GrammarState(first, [EOS])), len(hf))
    assert state.lane is first and not still_compiling.done()


def state_request(state):
    fake = request(eos=[EOS])
    fake.structured = state
    return fake


# ---- the sampler ---------------------------------------------------------------------------------------


def constrained(grammars, constraint, **params):
    hf, cache = grammars
    fake = request(eos=[EOS], **params)
    fake.structured = cache.new_state(constraint)
    return fake


def allowed_tokens(fake, vocab: int) -> set[int]:
    bitmask = fill_bitmask([fake.structured], vocab)
    logits = apply_token_bitmask(torch.zeros(1, vocab), bitmask)
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def test_constrained_rows_never_pick_a_disallowed_token(grammars):
    hf, _ = grammars
    vocab = len(hf)
    choice = StructuredOutputsParams(choice=["yes", "no"])
    forbidden = hf.encode(" maybe", add_special_tokens=False)[0]
    rows = [constrained(grammars, choice, temperature=0, logit_bias={forbidden: 100}),
            constrained(grammars, choice, temperature=1.5, seed=3),
            request(temperature=0, logit_bias={forbidden: 100})]   # unconstrained: takes the bias
    allowed = allowed_tokens(rows[0], vocab)
    assert forbidden not in allowed and len(allowed) < 10
    for step in range(4):
        logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(step))
        out = Sampler()(logits, rows)
        assert out.token_ids[0] in allowed and out.token_ids[1] in allowed
        assert out.token_ids[2] == forbidden


def test_an_emptied_constrained_row_falls_back_to_the_grammar_not_to_raw_logits(grammars):
    hf, _ = grammars
    vocab = len(hf)
    fake = constrained(grammars, StructuredOutputsParams(regex="ab"), temperature=0, min_tokens=5)
    for token in hf.encode("ab", add_special_tokens=False):
        fake.structured.accept(token)
        fake.output_token_ids.append(token)
    assert allowed_tokens(fake, vocab) == {EOS}   # complete: only the stop token remains
    # min_tokens bans EOS, which empties the row: the grammar still wins.
    assert Sampler()(torch.randn(1, vocab), [fake]).token_ids == [EOS]
    fake.structured.accept(EOS)
    assert fake.structured.is_terminated
    with pytest.raises(StructuredOutputError, match="already complete"):
        Sampler()(torch.randn(1, vocab), [fake])


def test_a_refused_token_is_an_error_not_a_silent_skip(grammars):
    fake = constrained(grammars, StructuredOutputsParams(regex="[0-9]+"), temperature=0)
    letter = grammars[0].encode("x", add_special_tokens=False)[0]
    with pytest.raises(StructuredOutputError, match=f"the grammar refused token {letter} after 0 tokens"):
        fake.structured.accept(letter)


def test_prefetched_masks_are_the_masks_of_where_each_state_stands(grammars):
    """prefetch_bitmask fills rows in the background; fill_bitmask hands them out only for states
    still where they were then (in any order, any subset), and fills afresh after a token."""
    hf, cache = grammars
    vocab = len(hf)
    schema = StructuredOutputsParams(json={"type": "object", "properties": {"n": {"type": "integer"}}})
    states = [cache.new_state(schema) for _ in range(3)]
    states[1].accept(hf.encode("{", add_special_tokens=False)[0])
    fresh = [fill_bitmask([state], vocab)[0] for state in states]   # one row each, no prefetch
    assert not torch.equal(fresh[0], fresh[1])

    prefetch_bitmask(states, vocab)
    whole = fill_bitmask(states, vocab)
    assert all(torch.equal(whole[i], fresh[i]) for i in range(3))
    assert all(state.take_prefetched() is None for state in states)   # handed out once

    prefetch_bitmask(states, vocab)
    assert torch.equal(fill_bitmask([states[2], states[1]], vocab), torch.stack([fresh[2], fresh[1]]))
    prefetch_bitmask(states, vocab)
    states[0].accept(hf.encode("{", add_special_tokens=False)[0])   # waits for the fill, then moves on
    assert torch.equal(fill_bitmask(states[:2], vocab), torch.stack([fresh[1], fresh[1]]))


def test_a_prefetch_that_fails_reports_when_the_row_is_sampled(grammars):
    hf, cache = grammars
    vocab = len(hf)
    state = cache.new_state(StructuredOutputsParams(regex="ab"))
    for token in hf.encode("ab", add_special_tokens=False) + [EOS]:
        state.accept(token)
    prefetch_bitmask([state], vocab)   # a terminated grammar: the background fill raises
    with pytest.raises(StructuredOutputError, match="already complete"):
        fill_bitmask([state], vocab)
