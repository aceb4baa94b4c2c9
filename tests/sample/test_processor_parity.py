"""Each batched processor against its transformers counterpart, row by row, on random logits and
token histories. Batches mix rows that use an option with rows that do not (those must be left
exactly as they were) and rows of different lengths."""

from __future__ import annotations

import pytest
import torch
from sample_fakes import request
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from ondo.sample import Sampler, warp

VOCAB = 40


def random_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3  # [rows, vocab]


def random_tokens(length: int, seed: int, high: int = 8) -> list[int]:
    # A small id range makes repeats, n-gram and bad-word matches frequent.
    return torch.randint(0, high, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_apply(processor, history: list[int], row_logits: torch.Tensor) -> torch.Tensor:
    """Run a transformers processor on one row, as generate() would with this history."""
    return processor(torch.tensor([history]), row_logits[None].clone())[0]


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same -inf mask and the same finite values."""
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite])


def test_repetition_penalty_matches_transformers():
    penalties = [1.3, 1.0, 0.7, 2.0]
    reqs = [request(prompt=random_tokens(5 + i, i), output=random_tokens(i * 2, 10 + i),
                    repetition_penalty=p) for i, p in enumerate(penalties)]
    logits = random_logits(len(reqs), 0)
    out = Sampler().apply_processors(logits, reqs)
    for i, (r, p) in enumerate(zip(reqs, penalties)):
        history = r.prompt_token_ids + r.output_token_ids
        assert_same(out[i], hf_apply(RepetitionPenaltyLogitsProcessor(p), history, logits[i]))


def test_a_tiny_repetition_penalty_overflows_to_the_largest_finite_logit():
    # transformers gives +inf here, which softmax turns into a row of NaN: ondo keeps the order finite.
    reqs = [request(prompt=[1, 2], output=[], repetition_penalty=1.2e-38)]
    logits = torch.tensor([[2.0, 5.0, -3.0, float("-inf"), 0.5]])
    out = Sampler().apply_processors(logits, reqs)[0]
    expected = hf_apply(RepetitionPenaltyLogitsProcessor(1.2e-38), [1, 2], logits[0])
    assert torch.isposinf(expected[1]) and out[1] == torch.finfo(torch.float32).max
    assert out[2] == expected[2] and torch.isneginf(out[3]) and out[0] == 2.0 and out[4] == 0.5
    assert not out.isnan().any()


def test_presence_and_frequency_penalties_count_output_tokens_only():
    reqs = [request(prompt=[3, 3, 3, 4], output=[1, 1, 2], presence_penalty=0.5,
                    frequency_penalty=0.25),
            request(prompt=[1, 2], output=[5], presence_penalty=-1.0),
            request(prompt=[1, 2], output=[1, 2])]
    logits = random_logits(3, 1)
    out = Sampler().apply_processors(logits, reqs)
    for i, r in enumerate(reqs):
        expected = logits[i].clone()
        for token in set(r.output_token_ids):
            count = r.output_token_ids.count(token)
            expected[token] -= (r.sampling_params.frequency_penalty * count
                                + r.sampling_params.presence_penalty)
        torch.testing.assert_close(out[i], expected)


@pytest.mark.parametrize("seed", range(3))
def test_no_repeat_ngram_matches_transformers(seed):
    sizes = [2, 3, 0, 1, 2, 4]
    reqs = [request(prompt=random_tokens(3 + 2 * i, seed * 10 + i, high=4),
                    output=random_tokens(i, seed * 10 + 50 + i, high=4),
                    no_repeat_ngram_size=n) for i, n in enumerate(sizes)]
    logits = random_logits(len(reqs), seed)
    out = Sampler().apply_processors(logits, reqs)
    for i, (r, n) in enumerate(zip(reqs, sizes)):
        history = r.prompt_token_ids + r.output_token_ids
        expected = hf_apply(NoRepeatNGramLogitsProcessor(n), history, logits[i]) if n else logits[i]
        assert_same(out[i], expected)
    assert torch.isneginf(out).any()  # the histories are built so that bans do happen


@pytest.mark.parametrize("seed", range(3))
def test_bad_words_match_transformers(seed):
    words_per_row = [
        [[5], [1, 2], [2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4]],  # last: longer than history
        [],
        [[3, 1], [1, 3, 1], [7]],
        [[0, 0], [1, 1], [2, 2], [3, 3]],
    ]
    reqs = [request(prompt=random_tokens(4 + i, seed * 7 + i, high=4),
                    output=random_tokens(2 * i, seed * 7 + 30 + i, high=4), bad_words=words)
            for i, words in enumerate(words_per_row)]
    logits = random_logits(len(reqs), seed)
    out = Sampler().apply_processors(logits, reqs)
    for i, (r, words) in enumerate(zip(reqs, words_per_row)):
        history = r.prompt_token_ids + r.output_token_ids
        expected = hf_apply(NoBadWordsLogitsProcessor(words), history, logits[i]) if words else logits[i]
        assert_same(out[i], expected)
    # Row 3 always completes one of its pairs, so more than the two one-token words are banned.
    assert torch.isneginf(out).sum() > 2


def test_bad_word_longer_than_every_history():
    words = [[1, 2, 3, 4, 5, 6], [9]]
    reqs = [request(prompt=[1, 2], bad_words=words)]
    logits = random_logits(1, 8)
    out = Sampler().apply_processors(logits, reqs)
    assert_same(out[0], hf_apply(NoBadWordsLogitsProcessor(words), [1, 2], logits[0]))


def test_min_new_tokens_matches_transformers():
    eos, stop = {2}, {7, 9}
    cases = [(3, 1), (3, 3), (0, 0), (5, 4)]  # (min_tokens, tokens generated so far)
    reqs = [request(prompt=[1, 4, 5], output=random_tokens(done, i), eos=eos, stop=stop,
                    min_tokens=minimum) for i, (minimum, done) in enumerate(cases)]
    logits = random_logits(len(reqs), 3)
    out = Sampler().apply_processors(logits, reqs)
    for i, (r, (minimum, _)) in enumerate(zip(reqs, cases)):
        processor = MinNewTokensLengthLogitsProcessor(3, minimum, sorted(eos | stop))
        assert_same(out[i], hf_apply(processor, r.prompt_token_ids + r.output_token_ids, logits[i]))


def test_min_length_counts_the_prompt_like_transformers():
    prompt = [1, 4, 5, 6]
    for done, min_length in [(0, 6), (2, 6), (1, 3)]:
        req = request(prompt=prompt, output=random_tokens(done, done), eos={2}, min_length=min_length)
        req.min_tokens = req.sampling_params.resolve_min_tokens(len(prompt))  # as the engine does
        logits = random_logits(1, done)
        out = Sampler().apply_processors(logits, [req])
        processor = MinLengthLogitsProcessor(min_length, [2])
        assert_same(out[0], hf_apply(processor, prompt + req.output_token_ids, logits[0]))


WARPER_CASES = [
    ("temperature", [0.5, 1.0, 1.7], TemperatureLogitsWarper),
    ("top_k", [1, 5, 39, 40, 100], TopKLogitsWarper),
    ("top_p", [0.1, 0.5, 0.9, 1.0], TopPLogitsWarper),
    ("min_p", [0.0, 0.05, 0.3, 1.0], MinPLogitsWarper),
    ("typical_p", [0.2, 0.6, 0.95], TypicalLogitsWarper),
    ("epsilon_cutoff", [0.001, 0.02, 0.1], EpsilonLogitsWarper),
    ("eta_cutoff", [0.001, 0.02, 0.1], EtaLogitsWarper),
]


@pytest.mark.parametrize("name,values,warper", WARPER_CASES, ids=[c[0] for c in WARPER_CASES])
def test_warper_matches_transformers(name, values, warper):
    params = [request(**{name: v}).sampling_params for v in values]
    params.append(request().sampling_params)  # a row that uses no warper stays untouched
    logits = random_logits(len(params), 4)
    out = warp(logits, params)
    for i, value in enumerate(values):
        assert_same(out[i], hf_apply(warper(value), [], logits[i]))
    assert torch.equal(out[-1], logits[-1])


def test_warper_chain_matches_transformers_order():
    settings = [dict(temperature=0.7, top_k=12, top_p=0.8, min_p=0.02, typical_p=0.9),
                dict(temperature=1.3, top_k=30, top_p=0.95),
                dict(top_p=0.6, epsilon_cutoff=0.01, eta_cutoff=0.02)]
    params = [request(**s).sampling_params for s in settings]
    logits = random_logits(len(params), 5)
    out = warp(logits, params)
    for i, s in enumerate(settings):
        chain = LogitsProcessorList([
            TemperatureLogitsWarper(s.get("temperature", 1.0)),
            TopKLogitsWarper(s.get("top_k", VOCAB)),
            TopPLogitsWarper(s.get("top_p", 1.0)),
            MinPLogitsWarper(s.get("min_p", 0.0)),
        ])
        if "typical_p" in s:
            chain.append(TypicalLogitsWarper(s["typical_p"]))
        if "epsilon_cutoff" in s:
            chain.append(EpsilonLogitsWarper(s["epsilon_cutoff"]))
        if "eta_cutoff" in s:
            chain.append(EtaLogitsWarper(s["eta_cutoff"]))
        assert_same(out[i], chain(torch.zeros(1, 0, dtype=torch.long), logits[i][None].clone())[0])


def test_logit_bias_and_allowed_tokens():
    reqs = [request(logit_bias={3: 5.0, 7: -100}),
            request(allowed_token_ids=[1, 4, 9], logit_bias={4: 1.5}),
            request()]
    logits = random_logits(3, 6)
    out = Sampler().apply_processors(logits, reqs)
    expected0 = logits[0].clone()
    expected0[3] += 5.0
    expected0[7] -= 100
    torch.testing.assert_close(out[0], expected0)
    assert torch.isneginf(out[1]).sum() == VOCAB - 3
    torch.testing.assert_close(out[1, [1, 4, 9]], logits[1, [1, 4, 9]] + torch.tensor([0, 1.5, 0]))
    assert torch.equal(out[2], logits[2])


def test_custom_processors_see_output_tokens_and_run_first():
    seen = []

    def boost_last(output_ids, row_logits):  # vLLM's two-argument form
        seen.append(list(output_ids))
        row_logits[output_ids[-1]] = 100.0
        return row_logits

    def ban_prompt(prompt_ids, output_ids, row_logits):  # the three-argument form
        return row_logits.index_fill(0, torch.tensor(prompt_ids), float("-inf"))

    reqs = [request(prompt=[1, 2], output=[5, 6], logits_processors=[boost_last]),
            request(prompt=[1, 2], output=[6], logits_processors=[ban_prompt],
                    repetition_penalty=2.0)]
    logits = random_logits(2, 7)
    original = logits.clone()
    out = Sampler().apply_processors(logits, reqs)
    assert seen == [[5, 6]]
    assert out[0, 6] == 100.0
    assert torch.isneginf(out[1, [1, 2]]).all()
    assert torch.equal(logits, original)  # in-place edits by user code never reach the caller
