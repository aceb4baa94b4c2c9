"""The sampler end to end: distributions (chi-square), seeding, greedy, log-probs, and that a
processor no request uses never runs."""

from __future__ import annotations

import math

import pytest
import torch
from sample_fakes import request
from scipy.stats import chisquare

from ondo.sample import Sampler, logits_processors, prompt_logprobs

# A small fixed distribution, most likely token first.
PROBS = [0.35, 0.25, 0.15, 0.10, 0.08, 0.04, 0.02, 0.01]
DRAWS = 6000


def reference_distribution(name: str, value: float) -> list[float]:
    """What top_k / top_p / min_p / temperature should leave of PROBS, written from the
    definitions (not from the code under test)."""
    if name == "temperature":
        scaled = [p ** (1 / value) for p in PROBS]
        return [s / sum(scaled) for s in scaled]
    if name == "top_k":
        kept = PROBS[:value]
    elif name == "top_p":  # the smallest most-likely set whose mass reaches top_p
        kept, mass = [], 0.0
        for p in PROBS:
            kept.append(p)
            mass += p
            if mass >= value:
                break
    elif name == "min_p":
        kept = [p for p in PROBS if p >= value * max(PROBS)]
    kept = kept + [0.0] * (len(PROBS) - len(kept))
    return [p / sum(kept) for p in kept]


def sample_counts(**params) -> list[int]:
    torch.manual_seed(0)  # unseeded rows use the default generator
    logits = torch.tensor(PROBS).log().expand(DRAWS, -1).contiguous()  # [draws, vocab]
    shared = request(**params).sampling_params
    reqs = [request() for _ in range(DRAWS)]
    for r in reqs:
        r.sampling_params = shared
    tokens = Sampler()(logits, reqs).token_ids
    return [tokens.count(t) for t in range(len(PROBS))]


def fits(observed: list[int], expected_probs: list[float]) -> bool:
    """Chi-square goodness of fit at the 0.1% level; a token expected never must never appear."""
    if any(o and not e for o, e in zip(observed, expected_probs)):
        return False
    pairs = [(o, e * DRAWS) for o, e in zip(observed, expected_probs) if e > 0]
    return chisquare([o for o, _ in pairs], [e for _, e in pairs]).pvalue > 1e-3


@pytest.mark.parametrize("name,value", [("top_k", 3), ("top_p", 0.8), ("min_p", 0.3),
                                        ("temperature", 2.0)])
def test_sampled_distribution_fits_the_truncated_distribution(name, value):
    observed = sample_counts(**{name: value})
    assert fits(observed, reference_distribution(name, value))
    # The same draws must reject a wrong expectation, or the test could never fail.
    assert not fits(observed, [p / sum(PROBS) for p in PROBS] if name != "temperature"
                    else reference_distribution("temperature", 1.0))


def run_steps(position: int, batch: list, steps: int = 6, vocab: int = 500) -> list[int]:
    """Feed the same per-step logits; return the tokens of the row at `position`."""
    tokens = []
    for step in range(steps):
        logits = torch.randn(len(batch), vocab, generator=torch.Generator().manual_seed(step))
        if position:  # the row under test always sees the same logits, wherever it sits
            logits[position] = torch.randn(vocab, generator=torch.Generator().manual_seed(step))
        tokens.append(Sampler()(logits, batch).token_ids[position])
    return tokens


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_mixed_batch():
    settings = dict(temperature=1.5, top_p=0.95, seed=1234)
    alone = run_steps(0, [request(**settings)])
    batch = [request(temperature=0.8), request(temperature=0), request(**settings),
             request(seed=99, top_k=50), request(repetition_penalty=1.2, min_p=0.05)]
    assert run_steps(2, batch) == alone
    assert run_steps(0, [request(**{**settings, "seed": 4321})]) != alone


def test_unseeded_runs_differ():
    first = run_steps(0, [request(temperature=1.5)], steps=8)
    second = run_steps(0, [request(temperature=1.5)], steps=8)
    assert first != second


def test_greedy_takes_the_argmax_of_the_processed_logits():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    best = int(logits[0].argmax())
    reqs = [request(temperature=0, output=[best], repetition_penalty=1e6),
            request(do_sample=False, top_k=1),
            request(temperature=0)]
    out = Sampler()(logits, reqs).token_ids
    penalised = logits[0].clone()
    penalised[best] = penalised[best] / 1e6 if penalised[best] > 0 else penalised[best] * 1e6
    assert out == [int(penalised.argmax()), int(logits[1].argmax()), int(logits[2].argmax())]
    assert out[0] != best


def test_logprobs_are_raw_and_top_k_sorted():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    reqs = [request(logprobs=4, temperature=0.5, repetition_penalty=1.5, output=[1, 2]),
            request(logprobs=0, top_k=2),
            request()]
    out = Sampler()(logits, reqs)
    raw = logits.log_softmax(dim=-1)
    for i, token in enumerate(out.token_ids):
        assert math.isclose(out.logprobs[i], float(raw[i, token]), rel_tol=1e-6)
    values, indices = raw[0].topk(4)
    assert [t for t, _ in out.top_logprobs[0]] == indices.tolist()
    assert [v for _, v in out.top_logprobs[0]] == pytest.approx(values.tolist())
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []


def test_no_logprobs_unless_asked():
    out = Sampler()(torch.randn(2, 10), [request(), request(temperature=0)])
    assert out.logprobs is None and out.top_logprobs is None


def test_prompt_logprobs_helper():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(3))
    targets = [5, 0, 19, 7]
    result = prompt_logprobs(logits, targets, k=3)
    raw = logits.log_softmax(dim=-1)
    for i, entry in enumerate(result):
        assert next(iter(entry)) == targets[i]
        assert entry[targets[i]] == pytest.approx(float(raw[i, targets[i]]))
        assert set(raw[i].topk(3).indices.tolist()) <= set(entry)
        assert len(entry) in (3, 4)


def test_a_row_left_without_tokens_falls_back_to_its_raw_logits():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(4))
    reqs = [request(allowed_token_ids=[2], eos={2}, min_tokens=1, temperature=0),
            request(allowed_token_ids=[2], eos={2}, min_tokens=1)]
    out = Sampler()(logits, reqs).token_ids
    assert out[0] == int(logits[0].argmax())
    assert 0 <= out[1] < 10


def test_processors_no_request_uses_never_run(monkeypatch):
    called = []
    for name in dir(logits_processors):
        if name.startswith("apply_"):
            monkeypatch.setattr(logits_processors, name,
                                lambda *a, _name=name, _f=getattr(logits_processors, name):
                                called.append(_name) or _f(*a))
    logits = torch.randn(3, 16)
    Sampler()(logits, [request(), request(temperature=0), request(seed=1)])
    assert called == []
    Sampler()(logits, [request(), request(top_k=4), request(min_p=0.1)])
    assert called == ["apply_top_k", "apply_min_p"]
    called.clear()
    Sampler()(logits[:2], [request(temperature=0.5, top_p=0.9), request(top_k=3)])
    assert called == ["apply_temperature", "apply_top_k_top_p"]
