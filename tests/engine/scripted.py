"""Helpers shared by the engine's launch-ahead tests: comparable outputs, and an engine stepped by hand."""
from __future__ import annotations

import pytest

from ondo import LLM


def summary(outputs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def drive(llm: LLM, script: dict[int, tuple]) -> dict[str, list]:
    """Step the engine by hand, adding ("add", id, prompt, params) or aborting ("abort", id) requests
    before the given steps; the final output of each request."""
    engine, final, step = llm.engine, {}, 0
    while engine.has_unfinished_requests() or step <= max(script):
        action = script.get(step)
        if action and action[0] == "add":
            engine.add_request(*action[1:])
        elif action:
            engine.abort_request(action[1])
        for output in engine.step():
            final[output.request_id] = summary([output])
        step += 1
    return final


def assert_logprobs_close(got, expected) -> None:
    """Two completions' per-token log-probs: the same tokens and ranks, values within float32 rounding.
    A step launched ahead may hold a row more or less than the synchronous step (a request that just
    finished), and a different batch may round a logit's last bit differently."""
    assert len(got) == len(expected)
    for position, expected_position in zip(got, expected):
        assert {t: lp.rank for t, lp in position.items()} == {t: lp.rank for t, lp in expected_position.items()}
        for token, logprob in position.items():
            assert logprob.logprob == pytest.approx(expected_position[token].logprob, rel=1e-5, abs=1e-6)
