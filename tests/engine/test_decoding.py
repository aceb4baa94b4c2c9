"""Decoding options inside the continuous batch: stop strings, min_tokens, n/best_of, seeds, streaming."""
from __future__ import annotations

import pytest

from ondo import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_with_tokenizer):
    return LLM(str(tiny_llama_with_tokenizer[0]), dtype="float32")


PROMPT = "The quick brown fox jumps over the lazy dog because"


def greedy(llm, **options):
    options = {"temperature": 0, "max_tokens": 40, "ignore_eos": True, **options}
    return llm.generate([PROMPT], SamplingParams(**options))[0].outputs[0]


def token_texts(llm, token_ids):
    return [llm.tokenizer.decode([t]) for t in token_ids]


def straddling_stop(llm, base):
    """A 4-character string that spans the boundary between two generated tokens."""
    pieces = token_texts(llm, base.token_ids)
    start = 0
    for i in range(len(pieces) - 1):
        start += len(pieces[i])
        if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2:
            candidate = base.text[start - 2:start + 2]
            if base.text.find(candidate) == start - 2:    # its first occurrence is at this boundary
                return candidate, start - 2
    pytest.skip("no token boundary with a unique 4-character window in this output")


def test_stop_string_across_tokens(llm):
    base = greedy(llm)
    stop, index = straddling_stop(llm, base)
    cut = greedy(llm, stop=[stop])
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (base.text[:index], "stop", stop)
    kept = greedy(llm, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == base.text[:index + len(stop)]
    assert len(cut.token_ids) < len(base.token_ids)


def test_stop_inside_first_token_and_earliest_of_several(llm):
    base = greedy(llm)
    first = token_texts(llm, base.token_ids[:1])[0]
    assert len(first.strip()) >= 1
    inside = first.strip()[-1]
    out = greedy(llm, stop=[inside])
    assert out.text == base.text[:base.text.index(inside)] and len(out.token_ids) == 1
    later, earlier = base.text[20:24], base.text[8:11]
    if base.text.index(earlier) < base.text.index(later):
        out = greedy(llm, stop=[later, earlier])
        assert out.stop_reason == earlier and out.text == base.text[:base.text.index(earlier)]


def test_stop_token_ids_and_reason(llm):
    base = greedy(llm)
    stop_token = base.token_ids[5]
    out = greedy(llm, stop_token_ids=[stop_token])
    first = base.token_ids.index(stop_token)
    assert out.token_ids == base.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_token)


def test_min_tokens_suppresses_eos(llm):
    eos = llm.tokenizer.eos_token_id
    eager_eos = {"temperature": 0, "max_tokens": 30, "logit_bias": {eos: 100.0}}
    assert llm.generate([PROMPT], SamplingParams(**eager_eos))[0].outputs[0].token_ids == [eos]
    out = llm.generate([PROMPT], SamplingParams(min_tokens=6, **eager_eos))[0].outputs[0]
    assert len(out.token_ids) == 7 and out.token_ids[-1] == eos and eos not in out.token_ids[:6]
    assert out.finish_reason == "stop"


def test_best_of_returns_n_sorted_and_shares_the_prompt(llm):
    prompt = PROMPT * 4
    before = llm.engine.stats()["prefix_cache_hits"]
    result = llm.generate([prompt], SamplingParams(n=3, best_of=5, temperature=1.0, max_tokens=12, seed=7))[0]
    outputs = result.outputs
    assert len(outputs) == 3 and [o.index for o in outputs] == [0, 1, 2]
    scores = [o.cumulative_logprob for o in outputs]
    assert scores == sorted(scores, reverse=True)
    prompt_len = len(result.prompt_token_ids)
    full_blocks = (prompt_len - 1) // 16
    # The four followers reused the leader's full prompt blocks instead of recomputing them.
    assert llm.engine.stats()["prefix_cache_hits"] - before >= 4 * full_blocks * 16


def test_n_without_best_of_keeps_index_order(llm):
    outs = llm.generate([PROMPT], SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3))[0].outputs
    assert [o.index for o in outs] == [0, 1] and outs[0].token_ids != outs[1].token_ids


def new_bigrams_only(sequence: list[int], start: int) -> bool:
    """True when no token at or after `start` completes a bigram seen earlier in the sequence."""
    seen = set(zip(sequence[:start - 1], sequence[1:start]))
    for j in range(start, len(sequence)):
        pair = (sequence[j - 1], sequence[j])
        if pair in seen:
            return False
        seen.add(pair)
    return True


def test_no_repeat_ngram_on_a_model_that_repeats():
    builtin = LLM()                                  # SmolLM2 loops on this prompt when greedy
    prompt = "List: apple, apple, apple, apple,"
    prompt_ids = builtin.tokenizer.encode(prompt)
    params = {"temperature": 0, "max_tokens": 40}
    loops = builtin.generate([prompt], SamplingParams(**params))[0].outputs[0].token_ids
    assert not new_bigrams_only(prompt_ids + loops, len(prompt_ids))
    assert len(set(zip(loops, loops[1:]))) < 5
    out = builtin.generate([prompt], SamplingParams(no_repeat_ngram_size=2, **params))[0].outputs[0].token_ids
    assert len(out) == 40 and new_bigrams_only(prompt_ids + out, len(prompt_ids))


def test_seeded_request_same_alone_and_in_mixed_batch(llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPT], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, repetition_penalty=1.3),
              SamplingParams(temperature=0.7, top_k=5, max_tokens=30, presence_penalty=0.5)]
    batch = llm.generate(["Hello there", PROMPT, "Another prompt entirely", "x y z"], [others[0], seeded] + others[1:])
    assert batch[1].outputs[0].token_ids == alone
    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    runs = {tuple(llm.generate([PROMPT], unseeded)[0].outputs[0].token_ids) for _ in range(3)}
    assert len(runs) > 1


def test_streamed_deltas_add_up_to_the_final_text(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.8, max_tokens=30, seed=5, stop=["the"], ignore_eos=True)
    engine.add_request("stream", PROMPT, params)
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            pieces.append(output.outputs[0].text_delta)
            final = output
    assert final.finished and "".join(pieces) == final.outputs[0].text
    assert "the" not in final.outputs[0].text or final.outputs[0].finish_reason == "length"


def test_prompt_logprobs_and_logprobs(llm):
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2))[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 5
    for token, position in zip(completion.token_ids, completion.logprobs):
        assert token in position and len(position) >= 3
        assert position[token].rank == 1          # greedy picks the most likely token
    assert abs(completion.cumulative_logprob - sum(p[t].logprob for t, p in zip(completion.token_ids, completion.logprobs))) < 1e-4
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token in position and all(lp.logprob <= 0 for lp in position.values())
