"""Decode steps launched ahead of the host (ondo/engine/async_decode.py) give exactly the synchronous outputs.

On the CPU the overlap is off by default; these tests switch it on (the torch backend takes the
device-side input ids like the CUDA graphs do), so its bookkeeping is checked without a GPU.
"""
from __future__ import annotations

import pytest

from ondo import LLM, SamplingParams
from ondo.engine.async_decode import DecodeOverlap
from tests.engine.scripted import drive, summary

PROMPTS = [[1, 5, 9, 33, 4], list(range(10, 47)), [7] * 17, list(range(100, 164)), [3, 4]]


def make_llm(folder, overlap: bool, **options) -> LLM:
    llm = LLM(str(folder), dtype="float32", **options)
    assert llm.engine.decode_overlap is None   # off on the CPU unless asked for
    if overlap:
        llm.engine.decode_overlap = DecodeOverlap(llm.engine)
    return llm


def assert_no_leak(llm):
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == stats["num_requests"] == 0


def greedy(max_tokens, **options):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **options)


@pytest.fixture(scope="module")
def sync_tokens(tiny_llama):
    """Each prompt's 40 greedy tokens on the synchronous path."""
    llm = make_llm(tiny_llama[0], overlap=False)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(40, ignore_eos=True))]


def test_staggered_lengths_match_sync(tiny_llama):
    params = [greedy(n, ignore_eos=True) for n in (3, 40, 17, 1, 25)]
    sync = make_llm(tiny_llama[0], overlap=False)
    fast = make_llm(tiny_llama[0], overlap=True, block_size=8)   # block boundaries crossed ahead
    assert summary(fast.generate(PROMPTS, params)) == summary(sync.generate(PROMPTS, params))
    overlap = fast.engine.decode_overlap
    assert overlap.num_adopted > 30 and overlap.num_discarded == 0   # length stops are foreseen
    assert_no_leak(fast)


def test_stop_tokens_at_different_steps_match_sync(tiny_llama, sync_tokens):
    # Each request stops on a token it generates at a different step: the step launched ahead holds an
    # extra token for it that must never reach the outputs.
    params = [greedy(40, ignore_eos=True, stop_token_ids=[tokens[i]]) for tokens, i in zip(sync_tokens, (2, 9, 5, 20, 0))]
    sync = make_llm(tiny_llama[0], overlap=False)
    fast = make_llm(tiny_llama[0], overlap=True)
    expected = summary(sync.generate(PROMPTS, params))
    assert len({len(o[0][0]) for o in expected}) >= 3 and any(o[0][2] == "stop" for o in expected)
    assert summary(fast.generate(PROMPTS, params)) == expected
    assert fast.engine.decode_overlap.num_discarded > 0
    assert_no_leak(fast)


def test_options_needing_host_tokens_match_sync(tiny_llama):
    params = [greedy(20, ignore_eos=True, logprobs=2), greedy(20, ignore_eos=True, repetition_penalty=1.3),
              greedy(20, ignore_eos=True, min_tokens=12), greedy(20, ignore_eos=True, logit_bias={7: 3.0}),
              greedy(20, ignore_eos=True, no_repeat_ngram_size=2)]
    sync = make_llm(tiny_llama[0], overlap=False)
    fast = make_llm(tiny_llama[0], overlap=True)
    expected = sync.generate(PROMPTS, params)
    got = fast.generate(PROMPTS, params)
    assert summary(got) == summary(expected)
    assert got[0].outputs[0].logprobs == expected[0].outputs[0].logprobs
    # Alone, the history-free options (logit_bias, min_tokens once reached) do run ahead.
    alone = [greedy(20, ignore_eos=True, min_tokens=12), greedy(20, ignore_eos=True, logit_bias={7: 3.0})]
    assert summary(fast.generate(PROMPTS[:2], alone)) == summary(sync.generate(PROMPTS[:2], alone))
    assert fast.engine.decode_overlap.num_adopted > 0
    assert_no_leak(fast)


def test_seeded_and_banned_batches_launch_their_forward_ahead(tiny_llama):
    """Without a grammar too, a batch whose sampling needs the newest token on the host (seeded draws,
    n-gram and bad-word bans, unmet min_tokens) launches only its next forward ahead and is sampled
    once the tokens are on the host: the same tokens as the synchronous path, seeds reproducible, and
    no draw spent on a step that is discarded. Log-probs alone keep a batch synchronous."""
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.1, seed=3, max_tokens=15, ignore_eos=True, no_repeat_ngram_size=2),
              greedy(20, ignore_eos=True, min_tokens=18), greedy(12, ignore_eos=True, repetition_penalty=1.3)]
    sync = make_llm(tiny_llama[0], overlap=False)
    fast = make_llm(tiny_llama[0], overlap=True)
    expected = summary(sync.generate(PROMPTS[:4], params))
    assert summary(fast.generate(PROMPTS[:4], params)) == expected
    assert summary(fast.generate(PROMPTS[:4], params)) == expected   # seeded: the same again
    overlap = fast.engine.decode_overlap
    assert overlap.num_adopted >= 2 * 10
    adopted = overlap.num_adopted
    fast.generate(PROMPTS[:2], [greedy(20, ignore_eos=True, logprobs=1), params[0]])   # finish together
    assert overlap.num_adopted == adopted
    assert_no_leak(fast)


def test_requests_added_and_aborted_mid_decode_match_sync(tiny_llama):
    script = {0: ("add", "a", PROMPTS[0], greedy(30, ignore_eos=True)),
              1: ("add", "b", PROMPTS[1], greedy(12, ignore_eos=True)),
              6: ("add", "c", PROMPTS[2], greedy(10, ignore_eos=True)),
              9: ("abort", "a"), 10: ("add", "d", PROMPTS[3], greedy(5, ignore_eos=True))}
    sync = make_llm(tiny_llama[0], overlap=False)
    fast = make_llm(tiny_llama[0], overlap=True)
    expected = drive(sync, script)
    assert expected["a"][0][0][2] is None and len(expected["a"][0][0][0]) < 30   # aborted: no final output
    assert drive(fast, script) == expected
    assert fast.engine.decode_overlap.num_adopted > 0 and fast.engine.decode_overlap.num_discarded > 0
    assert_no_leak(fast)


def test_stop_strings_and_eos_with_text_match_sync(tiny_llama_with_tokenizer):
    folder = tiny_llama_with_tokenizer[0]
    sync = make_llm(folder, overlap=False)
    fast = make_llm(folder, overlap=True)
    prompts = ["Hello there", "The capital of France is", "1, 2, 3,"]
    free = sync.generate(prompts, greedy(30, ignore_eos=True))
    # A stop string from the middle of each free-running text, so each stops at its own step.
    stops = [o.outputs[0].text[len(o.outputs[0].text) * (i + 1) // 4:][:3] for i, o in enumerate(free)]
    params = [greedy(30, stop=[s]) if s.strip() else greedy(30) for s in stops]
    expected = summary(sync.generate(prompts, params))
    assert summary(fast.generate(prompts, params)) == expected
    assert fast.engine.decode_overlap.num_adopted > 0
    assert_no_leak(fast)
