"""The split between the engine core (token deltas) and the text half (ondo/engine/text_output.py):
driving `Engine.core_step()` with an OutputProcessor of its own, as the API server's process does,
gives the RequestOutputs of `Engine.step()`; a stop string met in the text half stops the sequence in
the core (its blocks freed, no tokens generated past the stop)."""
from __future__ import annotations

import pytest

from ondo import LLM, SamplingParams
from ondo.engine.text_output import OutputProcessor

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def llm(tiny_llama_with_tokenizer):
    return LLM(str(tiny_llama_with_tokenizer[0]), dtype="float32")


def _in_process(llm, request_id, params):
    engine = llm.engine
    engine.add_request(request_id, PROMPT, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def _split(llm, request_id, params, deliver_stops=True):
    """The core driven through deltas only, with a separate OutputProcessor (as EngineCoreClient does)."""
    engine = llm.engine
    text = OutputProcessor(engine.tokenizer, engine.max_model_len)
    prompt_text, prompt_ids = engine.add_core_request(request_id, PROMPT, params)
    text.add(request_id, prompt_text, prompt_ids, params)
    outputs, steps = [], 0
    while engine.has_unfinished_requests():
        produced, stopped = text.process(engine.core_step())
        outputs += produced
        steps += 1
        if stopped and deliver_stops:
            engine.stop_sequences(stopped)
    return outputs, steps


def _view(outputs):
    return [[(c.text, c.text_delta, c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outputs]


def test_the_core_and_a_separate_text_half_give_the_in_process_outputs(llm):
    free = _in_process(llm, "free", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[-1]
    middle = free.outputs[0].text[len(free.outputs[0].text) // 2:][:2]
    cases = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[middle], logprobs=2),
             SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[middle],
                            include_stop_str_in_output=True, prompt_logprobs=1),
             SamplingParams(temperature=1.0, n=2, seed=7, max_tokens=12, ignore_eos=True, stop=["e", "a"]),
             SamplingParams(temperature=1.0, n=2, best_of=3, seed=7, max_tokens=6, logprobs=1)]
    for i, params in enumerate(cases):
        expected = _in_process(llm, f"in-{i}", params)
        got, _ = _split(llm, f"split-{i}", params)
        assert _view(got) == _view(expected), params
        assert [o.outputs[0].logprobs for o in got] == [o.outputs[0].logprobs for o in expected]
        assert got[-1].prompt_logprobs == expected[-1].prompt_logprobs
        assert got[-1].finished and expected[-1].finished


def test_a_stop_string_met_in_the_text_half_stops_the_core(llm):
    free = _in_process(llm, "free", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[-1]
    text = free.outputs[0].text
    stop = text[len(text) // 4:][:2]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    stats_before = llm.engine.stats()
    outputs, steps = _split(llm, "stopped", params)
    final = outputs[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop and len(final.token_ids) < 40
    # The core ran one step per token up to the stop, and not one more: its blocks are free again.
    assert steps == len(final.token_ids)
    generated = llm.engine.stats()["generation_tokens_total"] - stats_before["generation_tokens_total"]
    assert generated == len(final.token_ids)
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_requests"] == 0
    # Without the stop reaching the core, it runs to max_tokens while the text stays the same.
    unstopped, steps = _split(llm, "unstopped", params, deliver_stops=False)
    assert steps == 40 and _view(unstopped[-1:]) == _view(outputs[-1:])
