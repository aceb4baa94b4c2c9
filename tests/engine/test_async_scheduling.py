"""Async scheduling (ondo/engine/in_flight.py) gives exactly the synchronous outputs.

On the CPU it is off by default; these tests switch it on (`async_scheduling=True`: the torch backend
takes placeholder ids from the device like the CUDA graphs do), so its bookkeeping is checked without a GPU.
"""
from __future__ import annotations

import dataclasses

import pytest

from ondo import LLM, SamplingParams
from tests.engine.scripted import assert_logprobs_close, drive, summary

PROMPTS = [[1, 5, 9, 33, 4], list(range(10, 47)), [7] * 17, list(range(100, 164)), [3, 4]]


def make_llm(folder, overlap: bool, **options) -> LLM:
    llm = LLM(str(folder), dtype="float32", async_scheduling=overlap or None, **options)
    assert llm.engine.async_scheduling is overlap   # off on the CPU unless asked for
    return llm


def ahead(llm) -> int:
    """Steps launched before the previous step's tokens were read."""
    return llm.engine.num_steps_launched_ahead


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
    assert ahead(fast) > 30 and fast.engine.num_rows_not_sampled == 0   # length stops are foreseen
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
    assert fast.engine.num_rows_not_sampled > 0   # rows launched for requests that had just stopped
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
    assert_logprobs_close(got[0].outputs[0].logprobs, expected[0].outputs[0].logprobs)
    # Alone, the history-free options (logit_bias, min_tokens once reached) do run ahead.
    alone = [greedy(20, ignore_eos=True, min_tokens=12), greedy(20, ignore_eos=True, logit_bias={7: 3.0})]
    assert summary(fast.generate(PROMPTS[:2], alone)) == summary(sync.generate(PROMPTS[:2], alone))
    assert ahead(fast) > 0
    assert_no_leak(fast)


def test_seeded_and_banned_batches_run_ahead(tiny_llama):
    """A step is sampled once every earlier token is on the host, so options that read them (seeded
    draws, n-gram and bad-word bans, unmet min_tokens) run ahead too: the same tokens as the
    synchronous path, seeds reproducible. Log-probs come back with the tokens."""
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.1, seed=3, max_tokens=15, ignore_eos=True, no_repeat_ngram_size=2),
              greedy(20, ignore_eos=True, min_tokens=18), greedy(12, ignore_eos=True, repetition_penalty=1.3)]
    sync = make_llm(tiny_llama[0], overlap=False)
    fast = make_llm(tiny_llama[0], overlap=True)
    expected = summary(sync.generate(PROMPTS[:4], params))
    assert summary(fast.generate(PROMPTS[:4], params)) == expected
    assert summary(fast.generate(PROMPTS[:4], params)) == expected   # seeded: the same again
    assert ahead(fast) >= 2 * 10
    launched_ahead = ahead(fast)
    with_logprobs = [greedy(20, ignore_eos=True, logprobs=1), dataclasses.replace(params[0], logprobs=3)]
    expected = sync.generate(PROMPTS[:2], with_logprobs)
    got = fast.generate(PROMPTS[:2], with_logprobs)
    assert summary(got) == summary(expected)
    for completion, expected_completion in zip(got, expected):
        assert_logprobs_close(completion.outputs[0].logprobs, expected_completion.outputs[0].logprobs)
    assert ahead(fast) >= launched_ahead + 18
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
    assert ahead(fast) >= 15 and fast.engine.num_rows_not_sampled > 0   # a's row launched before its abort
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
    assert ahead(fast) > 0
    assert_no_leak(fast)


def test_prompt_chunks_beside_decodes_run_ahead(tiny_llama):
    """Steps that mix prompt chunks with decodes are launched ahead too: the decoding rows take their
    newest token from the device, the chunks' tokens from the host."""
    script = {0: ("add", "a", PROMPTS[0], greedy(30, ignore_eos=True)),
              3: ("add", "b", list(range(200, 300)), greedy(8, ignore_eos=True)),   # 100 tokens in chunks of 16
              5: ("add", "c", PROMPTS[3], greedy(6, ignore_eos=True, prompt_logprobs=2))}
    options = dict(max_num_batched_tokens=16, prefill_tokens_while_decoding=8)
    sync = make_llm(tiny_llama[0], overlap=False, **options)
    fast = make_llm(tiny_llama[0], overlap=True, **options)
    expected = drive(sync, script)
    assert drive(fast, script) == expected
    assert ahead(fast) >= 20   # all but the first step and those after c's log-prob steps
    assert_no_leak(fast)


def test_preempted_with_a_token_in_flight_matches_sync(tiny_llama):
    """A cache too small for every request: the newest is preempted while its token is in flight, waits
    for it to land, and is recomputed with it."""
    params = [greedy(40, ignore_eos=True) for _ in PROMPTS]
    # 28 blocks of 8 tokens (512 bytes a token: K and V, 2 layers, 2 heads of 16 float32) for 325 tokens
    options = dict(block_size=8, max_model_len=128, kv_cache_memory_bytes=28 * 8 * 512)
    sync = make_llm(tiny_llama[0], overlap=False, **options)
    fast = make_llm(tiny_llama[0], overlap=True, **options)
    expected = summary(sync.generate(PROMPTS, params))
    assert summary(fast.generate(PROMPTS, params)) == expected
    assert fast.engine.scheduler.num_preemptions > 0 and ahead(fast) > 30
    assert_no_leak(fast)
