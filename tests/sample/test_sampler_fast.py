"""The sampler's fast paths against their references: top-k / top-p / min-p decided among candidates
(candidates.py) against the full sort (`warp`), penalties from device-side state (penalty_state.py)
against penalties rebuilt from the token lists, and seeded rows independent of their batch."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from sample_fakes import rebuilt_penalties, request
from scipy.stats import chisquare

from ondo.sample import Sampler, warp
from ondo.sample import logits_processors as lp
from ondo.sample.candidates import candidate_budget, keep_mask, select_candidates

VOCAB = 4096  # large enough that the candidate budgets stay under a quarter of it


def random_logits(rows: int, seed: int, scale: float = 3.0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def peaked_logits(rows: int, seed: int) -> torch.Tensor:
    """A language-model-like row: a few dozen plausible tokens above a long flat tail."""
    logits = random_logits(rows, seed, scale=1.0)
    head = random_logits(rows, seed + 1, scale=2.0, vocab=40) + 8.0  # [rows, 40]
    places = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:40]
    logits[:, places] = head
    return logits


def fast_and_reference(logits: torch.Tensor, params: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    budgets = [candidate_budget(p, logits.shape[1]) for p in params]
    assert None not in budgets
    candidates = select_candidates(logits, params, budgets)
    return keep_mask(candidates, logits.shape[1]), warp(logits, params), candidates.needs_full_sort


def assert_same_kept_set_and_probs(fast: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(fast), torch.isneginf(reference))
    torch.testing.assert_close(fast.softmax(dim=-1), reference.softmax(dim=-1), rtol=1e-5, atol=1e-7)


SETTINGS = [dict(top_k=50), dict(top_k=1), dict(top_k=200, top_p=0.9),
            dict(temperature=0.8, top_k=50, top_p=0.95), dict(top_p=0.5), dict(top_p=0.9, min_p=0.05),
            dict(min_p=0.2, top_k=100), dict(temperature=2.0, top_p=0.3), dict(top_p=0.98),
            dict(temperature=0.3, top_k=30, top_p=0.8, min_p=0.1)]


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_candidates_keep_what_the_full_sort_keeps(settings):
    params = [request(**settings).sampling_params] * 12
    logits = torch.cat([peaked_logits(6, 0), random_logits(6, 1, scale=4.0)])  # [12, vocab]
    fast, reference, flagged = fast_and_reference(logits, params)
    decided = ~flagged
    assert decided[:6].all()  # peaked rows: every budget is enough
    assert_same_kept_set_and_probs(fast[decided], reference[decided])


def test_ties_are_cut_in_token_id_order_as_the_reference():
    # Logits on a coarse grid: many equal values at the top-k and top-p boundaries.
    logits = (peaked_logits(16, 2) * 2).round() / 2  # [16, vocab]
    logits[8:, :] = (random_logits(8, 3, scale=2.0) * 2).round() / 2
    for settings in (dict(top_k=20), dict(top_p=0.7), dict(top_k=30, top_p=0.9), dict(top_p=0.4, min_p=0.3)):
        params = [request(**settings).sampling_params] * 16
        fast, reference, flagged = fast_and_reference(logits, params)
        assert (~flagged).sum() >= 8, settings
        assert_same_kept_set_and_probs(fast[~flagged], reference[~flagged])


def test_a_row_the_budget_cannot_decide_is_flagged():
    flat = torch.zeros(3, VOCAB)  # all equal: top_k keeps every tied token, top_p half the vocabulary
    params = [request(top_k=10).sampling_params, request(top_p=0.5).sampling_params,
              request(top_k=10, min_p=0.5).sampling_params]
    _, _, flagged = fast_and_reference(flat, params)
    assert flagged.tolist() == [True, True, True]
    wide = random_logits(1, 4, scale=0.5)  # a nucleus far wider than TOP_P_CANDIDATES
    _, _, flagged = fast_and_reference(wide, [request(top_p=0.95).sampling_params])
    assert flagged.tolist() == [True]


def test_banned_tokens_and_a_short_finite_row():
    logits = peaked_logits(2, 5)
    logits[0, 10:] = float("-inf")  # ten finite tokens, fewer than the budget
    logits[1, ::2] = float("-inf")
    params = [request(top_p=0.9, top_k=50).sampling_params, request(top_p=0.8).sampling_params]
    fast, reference, flagged = fast_and_reference(logits, params)
    assert not flagged.any()
    assert_same_kept_set_and_probs(fast, reference)


def test_options_that_need_no_candidates_take_the_reference_path():
    assert candidate_budget(request(top_p=1.0).sampling_params, VOCAB) is None
    assert candidate_budget(request(top_k=VOCAB, top_p=1.0).sampling_params, VOCAB) is None
    assert candidate_budget(request(top_k=VOCAB + 5).sampling_params, VOCAB) is None
    assert candidate_budget(request(min_p=0.1).sampling_params, VOCAB) is None
    assert candidate_budget(request(top_k=50, typical_p=0.9).sampling_params, VOCAB) is None
    assert candidate_budget(request(top_k=50).sampling_params, 200) is None  # budget ~ vocabulary
    assert candidate_budget(request(top_k=50).sampling_params, VOCAB) == 128
    assert candidate_budget(request(top_k=64).sampling_params, VOCAB) == 128
    assert candidate_budget(request(top_k=3).sampling_params, VOCAB) == 64


def test_min_p_with_all_equal_logits_keeps_everything():
    logits = torch.zeros(2, VOCAB)
    reqs = [request(min_p=1.0, seed=1), request(min_p=0.3, top_k=5, seed=2)]
    out = Sampler()(logits, reqs)  # the second row is flagged (ties past its budget) and redone
    assert all(0 <= t < VOCAB for t in out.token_ids)
    params = [r.sampling_params for r in reqs]
    assert not torch.isneginf(warp(logits, params)).any()


def test_fast_draws_follow_the_truncated_distribution():
    draws = 3000
    probs = torch.tensor([0.35, 0.25, 0.15, 0.10, 0.08, 0.04, 0.02, 0.01])
    row = torch.full((VOCAB,), -30.0)
    row[:8] = probs.log()
    logits = row.expand(draws, -1).contiguous()  # [draws, vocab]
    shared = request(top_k=50, top_p=0.8).sampling_params
    reqs = [request() for _ in range(draws)]
    for r in reqs:
        r.sampling_params = shared
    torch.manual_seed(0)
    tokens = Sampler()(logits, reqs).token_ids
    observed = [tokens.count(t) for t in range(4)]
    assert sum(observed) == draws  # top_p 0.8 keeps the four most likely tokens
    expected = probs[:4] / probs[:4].sum() * draws
    assert chisquare(observed, expected.tolist()).pvalue > 1e-3
    assert chisquare(observed, [draws / 4] * 4).pvalue < 1e-3  # the test can fail


def run_steps(batch: list, position: int, steps: int = 5) -> list[int]:
    tokens, sampler = [], Sampler()
    for step in range(steps):
        logits = random_logits(len(batch), 100 + step, scale=1.0)
        logits[position] = peaked_logits(1, step)[0]
        tokens.append(sampler(logits, batch).token_ids[position])
    return tokens


def test_seeded_rows_give_the_same_tokens_alone_and_in_any_batch():
    fast = dict(temperature=0.8, top_p=0.95, top_k=50, seed=1234)
    wide = dict(top_p=0.95, seed=77)  # a flat row: flagged and redone every step
    alone_fast = run_steps([request(**fast)], 0)
    alone_wide = run_steps([request(**wide)], 0)
    others = [request(temperature=0.7), request(temperature=0), request(top_k=500, seed=3),
              request(top_p=0.9, typical_p=0.9), request(repetition_penalty=1.3, top_k=20),
              request(top_p=0.95)]
    assert run_steps(others[:3] + [request(**fast)] + others[3:], 3) == alone_fast
    assert run_steps(others[::-1] + [request(**fast)], 6) == alone_fast
    # The wide row gets random flat logits at other positions; where it sits its logits are peaked.
    assert run_steps([request(**wide)] + others, 0) == alone_wide
    assert run_steps([request(**{**fast, "seed": 4321})], 0) != alone_fast


def test_a_redone_row_reports_its_own_logprob():
    logits = random_logits(2, 7, scale=0.5)
    reqs = [request(top_p=0.95, logprobs=2), request(top_k=40, logprobs=0)]
    out = Sampler()(logits, reqs)
    raw = logits.log_softmax(dim=-1)
    for i, token in enumerate(out.token_ids):
        assert 0 <= token < VOCAB
        assert math.isclose(out.logprobs[i], float(raw[i, token]), rel_tol=1e-6)
    assert [t for t, _ in out.top_logprobs[0]] == raw[0].topk(2).indices.tolist()


# ---- penalties from the device-side state --------------------------------------------------------


def penalised(prompt, seed) -> object:
    return request(prompt=prompt, repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2,
                   temperature=0, seed=seed)


# On CUDA the penalty kernel reads the state by slot and adds each row's new token itself.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_state_follows_growth_replacement_and_reuse(device):
    sampler = Sampler()
    vocab = 64
    reqs = [penalised([i, i + 1, 5], i) for i in range(20)]  # more than the first capacity
    reqs.append(request(prompt=[1, 2], presence_penalty=-0.5))  # presence only

    def step(seed: int) -> None:
        logits = random_logits(len(reqs), seed, vocab=vocab)
        processed = sampler.apply_processors(logits.to(device), reqs).cpu()
        torch.testing.assert_close(processed, rebuilt_penalties(logits, reqs))  # exact but for FMA on CUDA
        for r, token in zip(reqs, processed.argmax(dim=-1).tolist()):  # any token: the state follows the lists
            r.output_token_ids.append(token)

    for seed in range(6):
        step(seed)
    reqs[3].output_token_ids = [7, 7, 8]  # replaced, not extended
    reqs[4].output_token_ids = reqs[4].output_token_ids[:-1]  # a token that was not kept
    reqs[5].output_token_ids[-1] = (reqs[5].output_token_ids[-1] + 1) % vocab  # same length, other token
    reqs[6].output_token_ids += [3, 3]  # two tokens since the last step
    del reqs[10:15]  # gone: their slots are reused by the newcomers
    gc.collect()
    reqs += [penalised([9, 9], 50 + i) for i in range(5)]
    for seed in range(10, 13):
        step(seed)
    assert sampler._penalties._capacity == 32


@pytest.mark.parametrize("device", DEVICES)
def test_finished_requests_free_their_slots_but_not_within_their_batch(device):
    sampler = Sampler()
    reqs = [penalised([i, 2 * i], i) for i in range(16)]  # the first capacity, full
    sampler.apply_processors(random_logits(16, 0, vocab=64).to(device), reqs)
    for r in reqs:
        r.is_finished = True  # still referenced, so only this flag frees their slots
    batch = [reqs[15], penalised([40, 41], 99), penalised([50], 98)]  # beside newcomers
    logits = random_logits(3, 1, vocab=64)
    torch.testing.assert_close(sampler.apply_processors(logits.to(device), batch).cpu(), rebuilt_penalties(logits, batch))
    assert sampler._penalties._capacity == 16  # reused, not grown


@pytest.mark.parametrize("device", DEVICES)
def test_siblings_and_subsets_keep_their_own_counts(device):
    sampler = Sampler()
    shared = request(prompt=[1, 2, 3], repetition_penalty=1.5, frequency_penalty=0.5).sampling_params
    first, second = request(prompt=[1, 2, 3]), request(prompt=[1, 2, 3])
    first.sampling_params = second.sampling_params = shared
    first.output_token_ids, second.output_token_ids = [4, 4], [5]
    plain = request(prompt=[9])
    logits = random_logits(3, 8, vocab=32)
    for batch in ([first, plain, second], [second], [plain, first]):  # other rows, other orders
        rows = logits[:len(batch)]
        torch.testing.assert_close(sampler.apply_processors(rows.to(device), batch).cpu(), rebuilt_penalties(rows, batch))


# ---- async scheduling (engine/in_flight.py) with penalties and sampling ----------------------------


def test_penalties_on_steps_launched_ahead_match_the_synchronous_path(tiny_llama):
    from ondo import LLM, SamplingParams
    prompts = [[1, 5, 9, 33, 4], list(range(10, 47)), [7] * 17]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.8),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, presence_penalty=1.5,
                             frequency_penalty=0.7),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                             frequency_penalty=0.4)]
    sync = LLM(str(tiny_llama[0]), dtype="float32", device="cpu")
    expected = [o.outputs[0].token_ids for o in sync.generate(prompts, params)]
    fast = LLM(str(tiny_llama[0]), dtype="float32", device="cpu", async_scheduling=True)  # off on the CPU unless set
    assert [o.outputs[0].token_ids for o in fast.generate(prompts, params)] == expected
    assert fast.engine.num_steps_launched_ahead > 10
    # Unseeded sampling runs ahead too (its tokens cannot be compared).
    sampled = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.1, max_tokens=16,
                             ignore_eos=True)
    launched_ahead = fast.engine.num_steps_launched_ahead
    outputs = fast.generate(prompts, sampled)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outputs)
    assert fast.engine.num_steps_launched_ahead > launched_ahead
    stats = fast.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_a_row_left_open_on_a_step_launched_ahead_is_redone(tiny_llama, monkeypatch):
    from ondo import LLM, SamplingParams
    from ondo.sample import candidates

    # A budget far too small: every top_p row comes back -1 and is redone on the host.
    monkeypatch.setattr(candidates, "TOP_P_CANDIDATES", 2)
    monkeypatch.setattr(candidates, "MAX_BUDGET_FRACTION", 1.0)
    llm = LLM(str(tiny_llama[0]), dtype="float32", device="cpu", async_scheduling=True)
    params = SamplingParams(temperature=1.0, top_p=0.99, max_tokens=12, ignore_eos=True,
                            presence_penalty=0.5)
    outputs = llm.generate([[1, 5, 9, 33, 4], [7] * 17], params)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outputs)
    assert llm.engine.sampler.num_redone_rows > 0 and llm.engine.num_rows_taken_back > 0
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


# ---- options derived once per steady batch (per_batch.py) -------------------------------------------


def test_derived_options_are_rebuilt_when_any_rows_params_object_changes():
    from ondo import SamplingParams
    from ondo.sample.per_batch import derived

    first, second = SamplingParams(top_k=5), SamplingParams(top_k=5)   # equal, but other objects
    built = []

    def build(params):
        built.append([p.top_k for p in params])
        return len(built)

    assert derived("test", [first, second], lambda: build([first, second])) == 1
    assert derived("test", [first, second], lambda: build([first, second])) == 1   # a new list, same objects
    assert derived("test", [second, first], lambda: build([second, first])) == 2   # another order
    assert derived("test", [second], lambda: build([second])) == 3
    assert derived("other", [second], lambda: build([second])) == 4   # names do not share entries
    assert derived("test", [second], lambda: build([second])) == 3


def test_a_steady_batch_whose_row_changes_options_samples_with_the_new_ones():
    """The candidates' options and penalty values are kept while the same params come back; a row
    given other params (a request replaced in the batch) is decided with its own."""
    vocab = 512   # wide enough for the candidates' path (budget 64 <= a quarter of it)
    reqs = [request(top_k=3, temperature=0.7, repetition_penalty=1.3, seed=i) for i in range(4)]
    assert candidate_budget(reqs[0].sampling_params, vocab) == 64
    sampler = Sampler()
    for step in range(3):
        logits = random_logits(4, step, vocab=vocab)
        assert torch.equal(sampler.apply_processors(logits, reqs), rebuilt_penalties(logits, reqs))
        sampler(logits, reqs)
    reqs[2] = request(top_k=1, repetition_penalty=3.0, prompt=(7, 8))   # top_k=1 sampling is the argmax
    for step in range(3, 12):
        logits = random_logits(4, step, scale=0.05, vocab=vocab)   # near ties: top_k=3 would often differ
        processed = sampler.apply_processors(logits, reqs)
        assert torch.equal(processed, rebuilt_penalties(logits, reqs))
        assert sampler(logits, reqs).token_ids[2] == int(processed[2].argmax())
