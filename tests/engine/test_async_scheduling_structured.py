"""Structured output under async scheduling (ondo/engine/in_flight.py): the forward of step N+1 runs
before N's tokens are read and N+1 is sampled with its grammar's mask afterwards, giving token for
token the synchronous path's outputs.

A tiny random-weight model over the real SmolLM2 tokenizer: its free text is noise, so every valid
output is the grammar's doing. The overlap is forced on the CPU as CUDA graphs would switch it on.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from ondo import LLM, SamplingParams
from ondo.sampling_params import StructuredOutputsParams
from tests.engine.scripted import assert_logprobs_close, drive, summary

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2}},
    "required": ["name", "age", "tags"]}
REGEX = r"[A-Z][a-z]{2,5}-[0-9]{3}"
CHOICES = ["Paris", "London", "Berlin"]
PROMPTS = ["Tell me about Bob.", "Give me JSON:", "x", "The capital of France is", "1, 2, 3,"]


@pytest.fixture(scope="module")
def engines(tiny_llama_with_tokenizer):
    """(launched ahead, synchronous) LLMs over the same model."""
    folder = str(tiny_llama_with_tokenizer[0])
    fast, sync = LLM(folder, dtype="float32", async_scheduling=True), LLM(folder, dtype="float32")
    assert not sync.engine.async_scheduling
    return fast, sync


def constrained(kind: str, **options) -> SamplingParams:
    constraint = {"json": StructuredOutputsParams(json=SCHEMA), "regex": StructuredOutputsParams(regex=REGEX),
                  "choice": StructuredOutputsParams(choice=CHOICES)}[kind]
    return SamplingParams(**{"temperature": 0, "max_tokens": 64, **options}, structured_outputs=constraint)


def assert_parses(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in CHOICES, text


def assert_no_leak(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == stats["num_requests"] == 0


def counters(llm: LLM) -> tuple[int, int]:
    """(steps launched before the previous step's tokens were read, rows taken back)"""
    return llm.engine.num_steps_launched_ahead, llm.engine.num_rows_taken_back


@pytest.mark.slow   # the first grammars compiled by both engines
def test_each_kind_alone_matches_sync_and_runs_ahead(engines):
    fast, sync = engines
    for kind in ("json", "regex", "choice"):
        adopted, _ = counters(fast)
        params = constrained(kind)
        expected = sync.generate(PROMPTS[:3], params)
        got = fast.generate(PROMPTS[:3], params)
        assert summary(got) == summary(expected), kind
        for output in got:
            assert output.outputs[0].finish_reason == "stop"
            assert_parses(kind, output.outputs[0].text)
        longest = max(len(o.outputs[0].token_ids) for o in got)
        # Most decode steps are launched ahead and adopted (a finished row that changes the batch's
        # graph size discards the step launched with it; the choices end within a few steps).
        assert counters(fast)[0] - adopted > (longest // 2 if kind != "choice" else 0), kind
    assert_no_leak(fast)


@pytest.mark.slow   # the first grammars compiled by both engines
def test_a_batch_mixing_structured_and_plain_requests_finishing_at_different_steps(engines):
    fast, sync = engines
    free = sync.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop_token = free[0].outputs[0].token_ids[9]
    # choice ends after a few tokens (its grammar terminates), the plain ones by a stop token at its
    # 10th step and by length at their 17th and 40th, the JSON and regex requests in between.
    params = [constrained("json"), constrained("choice"), constrained("regex"),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_token]),
              SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)]
    adopted, discarded = counters(fast)
    expected = summary(sync.generate(PROMPTS, params))
    assert len({len(o[0][0]) for o in expected}) >= 4   # they do finish at different steps
    got = fast.generate(PROMPTS, params)
    assert summary(got) == expected
    for kind, output in zip(("json", "choice", "regex"), got):
        assert_parses(kind, output.outputs[0].text)
    assert got[3].outputs[0].stop_reason == stop_token and len(got[3].outputs[0].token_ids) == 10
    assert counters(fast)[0] - adopted > 15
    print(f"adopted {counters(fast)[0] - adopted}, discarded {counters(fast)[1] - discarded}")
    assert_no_leak(fast)


def test_requests_added_and_aborted_mid_decode(engines):
    fast, sync = engines
    script = {0: ("add", "a", PROMPTS[0], constrained("json")),
              1: ("add", "b", PROMPTS[1], SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)),
              5: ("add", "c", PROMPTS[2], constrained("regex")),
              8: ("abort", "b"), 9: ("add", "d", PROMPTS[3], constrained("choice"))}

    expected, got = drive(sync, script), drive(fast, script)
    # A request added while a step is in flight joins the step after it, so b was aborted one token
    # earlier here: its greedy tokens are a prefix of the synchronous run's. The others are equal.
    (tokens, _, reason, _), = expected.pop("b")[0]
    (got_tokens, _, got_reason, _), = got.pop("b")[0]
    assert reason is got_reason is None and got_tokens and tokens[:len(got_tokens)] == got_tokens
    assert got == expected
    assert_parses("json", expected["a"][0][0][1])
    assert_no_leak(fast)


def test_seeds_penalties_bad_words_and_min_tokens_ride_along_in_a_structured_batch(engines):
    """By the time a step launched ahead for a structured batch is sampled, every earlier token is on
    the host: options that need them (and seeded draws, never spent on a discarded step) run ahead too."""
    fast, sync = engines
    params = [constrained("json", temperature=0.9, seed=11),
              constrained("regex", temperature=1.2, seed=5, repetition_penalty=1.3),
              SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True, bad_words=["the"]),
              SamplingParams(temperature=0, max_tokens=24, min_tokens=20, presence_penalty=0.7),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, no_repeat_ngram_size=2)]
    adopted, _ = counters(fast)
    expected = summary(sync.generate(PROMPTS, params))
    got = fast.generate(PROMPTS, params)
    assert summary(got) == expected
    assert_parses("regex", got[1].outputs[0].text)
    assert counters(fast)[0] - adopted > 10
    assert_no_leak(fast)


def test_rows_left_to_sampler_redo_in_a_structured_batch(engines, monkeypatch):
    from ondo.sample import candidates

    # A budget far too small: every top_p row comes back -1 and is redone on the host, and the row
    # launched on a placeholder for it is taken back.
    monkeypatch.setattr(candidates, "TOP_P_CANDIDATES", 2)
    monkeypatch.setattr(candidates, "MAX_BUDGET_FRACTION", 1.0)
    fast, sync = engines
    params = [constrained("json", temperature=1.0, top_p=0.99, seed=2), constrained("regex"),
              SamplingParams(temperature=0.7, top_p=0.95, seed=9, max_tokens=20, ignore_eos=True, logprobs=2)]
    redone, (_, discarded) = fast.engine.sampler.num_redone_rows, counters(fast)
    expected = sync.generate(PROMPTS[:3], params)
    got = fast.generate(PROMPTS[:3], params)
    assert summary(got) == summary(expected)
    assert_logprobs_close(got[2].outputs[0].logprobs, expected[2].outputs[0].logprobs)   # redone rows' too
    assert_parses("json", got[0].outputs[0].text)
    assert fast.engine.sampler.num_redone_rows > redone and counters(fast)[1] > discarded
    assert_no_leak(fast)


def test_a_request_whose_sampling_fails_mid_batch_fails_alone(engines):
    fast, sync = engines

    def breaks_after_three(output_ids, logits):
        if len(output_ids) >= 3:
            raise RuntimeError("processor gave up")
        return logits

    params = [constrained("json"), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                  logits_processors=[breaks_after_three]),
              constrained("regex")]
    expected = sync.generate(PROMPTS[:3], params)
    got = fast.generate(PROMPTS[:3], params)
    assert summary(got) == summary(expected)
    assert got[1].outputs[0].finish_reason == "error" and "processor gave up" in got[1].error
    assert len(got[1].outputs[0].token_ids) == 3
    assert_parses("json", got[0].outputs[0].text)
    assert_no_leak(fast)


def test_log_probs_of_a_structured_batch_come_back_with_its_tokens(engines):
    fast, sync = engines
    params = [constrained("json", logprobs=2), constrained("regex", n=2, best_of=3, temperature=0.8, seed=4)]
    launched_ahead = counters(fast)[0]
    expected = sync.generate(PROMPTS[:2], params)
    got = fast.generate(PROMPTS[:2], params)
    assert summary(got) == summary(expected)
    assert_logprobs_close(got[0].outputs[0].logprobs, expected[0].outputs[0].logprobs)
    assert [c.cumulative_logprob for c in got[1].outputs] == pytest.approx([c.cumulative_logprob for c in expected[1].outputs])
    assert counters(fast)[0] > launched_ahead + 10
    assert_no_leak(fast)
