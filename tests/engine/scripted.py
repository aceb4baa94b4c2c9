"""Helpers shared by the engine's launch-ahead tests: comparable outputs, and an engine stepped by hand."""
from __future__ import annotations

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
