"""TokenHistory: histories converted once, extended step by step, rebuilt when replaced."""

from __future__ import annotations

import gc

import torch
from sample_fakes import request

from ondo.sample import Sampler
from ondo.sample.token_history import TokenHistory


def test_output_grows_in_place_and_a_replaced_output_is_converted_again():
    history = TokenHistory()
    req = request(prompt=[1, 2], output=[])
    assert history.full(req).tolist() == [1, 2]
    for token in range(100):  # past the first buffer's capacity
        req.output_token_ids.append(token)
        assert history.output(req).tolist() == list(range(token + 1))
    req.output_token_ids = [7, 8]  # shorter: rebuilt
    assert history.full(req).tolist() == [1, 2, 7, 8]
    req.output_token_ids = [7, 9, 5]  # same length prefix but a different last cached token
    assert history.output(req).tolist() == [7, 9, 5]


def test_entries_go_away_with_their_request():
    history = TokenHistory()
    req = request(prompt=[3, 4])
    history.full(req)
    assert len(history._entries) == 1
    del req
    gc.collect()
    assert len(history._entries) == 0


def test_a_long_lived_sampler_matches_a_fresh_one_step_by_step():
    kept = Sampler()
    reqs = [request(prompt=[1, 2, 3], repetition_penalty=1.5, presence_penalty=0.4,
                    no_repeat_ngram_size=2, temperature=0, bad_words=[[4, 5]]),
            request(prompt=[5, 4], frequency_penalty=0.7, temperature=0)]
    for step in range(12):
        logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(step))
        expected = Sampler().apply_processors(logits, reqs)
        assert torch.equal(kept.apply_processors(logits, reqs), expected)
        for r, token in zip(reqs, kept(logits, reqs).token_ids):
            r.output_token_ids.append(token)
