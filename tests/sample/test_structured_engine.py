"""Structured output through the engine, on a tiny random-weight model over the real SmolLM2
tokenizer: its free text is noise, so every valid output below is the grammar's doing. The engines run
on the CPU on any machine: on a GPU the module's engine would hold the memory the others need
(tests/gpu/test_structured_overlap_gpu.py covers the GPU path)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from ondo import LLM, SamplingParams, SamplingParamsError
from ondo.engine.engine import RequestError
from ondo.sampling_params import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2}},
    "required": ["name", "age", "tags"]}
PROMPTS = ["Tell me about Bob.", "Give me JSON:", "x"]


@pytest.fixture(scope="module")
def llm(tiny_llama_with_tokenizer):
    return LLM(str(tiny_llama_with_tokenizer[0]), device="cpu")


def params(constraint: StructuredOutputsParams, **options) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 64, **options}, structured_outputs=constraint)


def texts(outputs) -> list[list[str]]:
    return [[c.text for c in o.outputs] for o in outputs]


def test_every_output_follows_its_schema_greedy_sampled_and_siblings(llm):
    json_schema = StructuredOutputsParams(json=SCHEMA)
    outputs = llm.generate(PROMPTS, [params(json_schema, temperature=0),
                                     params(json_schema, temperature=1.0, seed=7, n=2, best_of=3),
                                     params(json_schema, temperature=1.3, n=3)])
    completions = [c for o in outputs for c in o.outputs]
    assert len(completions) == 6
    for completion in completions:
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert len({c.text for c in completions}) > 1   # siblings follow their own matchers
    assert llm.engine.grammars.misses >= 1 and llm.engine.grammars.hits >= 5   # compiled once, shared


def test_regex_choice_grammar_and_json_object(llm):
    constraints = [StructuredOutputsParams(regex=r"[A-Z][a-z]{2,5}-[0-9]{3}"),
                   StructuredOutputsParams(choice=["Paris", "London", "서울"]),
                   StructuredOutputsParams(grammar='root ::= "(" item ("," item)* ")"\nitem ::= [0-9]'),
                   StructuredOutputsParams(json_object=True)]
    outputs = llm.generate(["a", "b", "c", "d"], [params(c, temperature=0.8, seed=1, max_tokens=200)
                                                  for c in constraints])
    regex_out, choice_out, grammar_out, object_out = (o.outputs[0] for o in outputs)
    assert re.fullmatch(r"[A-Z][a-z]{2,5}-[0-9]{3}", regex_out.text)
    assert choice_out.text in ("Paris", "London", "서울")
    assert re.fullmatch(r"\([0-9](,[0-9])*\)", grammar_out.text)
    if object_out.finish_reason == "stop":   # an open-ended object may run to max_tokens on noise
        assert isinstance(json.loads(object_out.text), dict)
    else:
        assert object_out.text.startswith("{")


def test_the_request_ends_when_the_grammar_does_even_with_ignore_eos(llm):
    out = llm.generate("q", params(StructuredOutputsParams(choice=["yes", "no"]), temperature=0,
                                   ignore_eos=True, max_tokens=50))[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"
    assert len(out.token_ids) <= 3   # the answer's tokens and the stop token, no more


def test_min_tokens_cannot_push_past_the_end_of_the_grammar(llm):
    out = llm.generate("q", params(StructuredOutputsParams(choice=["yes", "no"]), temperature=0,
                                   min_tokens=10))[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_stop_strings_and_streaming_deltas(llm):
    engine = llm.engine
    constraint = StructuredOutputsParams(json=SCHEMA)
    engine.add_request("streamed", "Bob:", params(constraint, temperature=0))
    engine.add_request("stopped", "Bob:", params(constraint, temperature=0, stop=['"age"']))
    streamed, final = {}, {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            streamed[output.request_id] = streamed.get(output.request_id, "") + output.outputs[0].text_delta
            final[output.request_id] = output.outputs[0]
    assert streamed["streamed"] == final["streamed"].text
    jsonschema.validate(json.loads(final["streamed"].text), SCHEMA)
    assert final["stopped"].stop_reason == '"age"'
    assert final["streamed"].text.startswith(final["stopped"].text) and streamed["stopped"] == final["stopped"].text


def test_constrained_batches_run_ahead_under_async_scheduling(tiny_llama_with_tokenizer, llm):
    """Their forwards are launched ahead and sampled with the mask once the previous tokens are read
    (tests/engine/test_async_scheduling_structured.py covers the cases)."""
    fast = LLM(str(tiny_llama_with_tokenizer[0]), device="cpu", async_scheduling=True)   # as CUDA graphs do
    batch = [params(StructuredOutputsParams(json=SCHEMA), temperature=0),
             SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
             params(StructuredOutputsParams(regex="[a-z]{4}"), temperature=0)]
    expected = texts(llm.generate(PROMPTS, batch))
    assert texts(fast.generate(PROMPTS, batch)) == expected
    jsonschema.validate(json.loads(expected[0][0]), SCHEMA)
    assert fast.engine.num_steps_launched_ahead > 10


def test_a_constraint_the_vocabulary_cannot_write_is_refused_when_added(llm):
    with pytest.raises(SamplingParamsError, match="vocabulary cannot write what it asks for"):
        llm.generate("x", params(StructuredOutputsParams(regex="\u0004")))   # no token holds this byte
    assert not llm.engine.has_unfinished_requests()


def test_a_constraint_the_vocabulary_cannot_finish_fails_its_request_as_bad_input(llm):
    # "C" is writable; the control byte 4 that must follow is in no token: a dead end after one token.
    failed, fine = llm.generate(["x", "y"], [params(StructuredOutputsParams(regex="C\u0004")),
                                             params(StructuredOutputsParams(choice=["yes", "no"]), temperature=0)])
    assert failed.outputs[0].finish_reason == "error" and failed.outputs[0].text == "C"
    assert "the grammar allows no token here" in failed.error and failed.error_is_input
    assert fine.error is None and fine.outputs[0].text in ("yes", "no")


def test_a_token_the_grammar_refuses_after_its_mask_allowed_it_fails_that_request_as_bad_input(llm):
    # llguidance 1.9.1 allows byte 0xB1 where this regex forces U+B1300's first byte 0xF2 (after U+00AD's
    # bytes), then refuses it. Found by the schema fuzzer; the other request goes on.
    regex = "o\u00c8\u00a4;\u00ad\U000b1300~"
    failed, fine = llm.generate(["x", "y"], [params(StructuredOutputsParams(regex=regex)),
                                             params(StructuredOutputsParams(choice=["yes", "no"]), temperature=0)])
    assert failed.outputs[0].finish_reason == "error" and failed.error_is_input
    assert "this constraint could not be followed: the grammar refused token" in failed.error
    assert fine.error is None and fine.outputs[0].text in ("yes", "no")


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_tiny_repetition_penalty_keeps_the_grammar(llm, temperature):
    # Dividing by 1.2e-38 overflows the repeated tokens' logits; the masked ones must stay masked.
    outputs = llm.generate(PROMPTS, params(StructuredOutputsParams(json=SCHEMA), temperature=temperature,
                                           repetition_penalty=1.2e-38, seed=3))
    for output in outputs:
        assert output.error is None and output.outputs[0].finish_reason in ("stop", "length"), output.error
        assert re.fullmatch(r"\{.*", output.outputs[0].text, re.S), output.outputs[0].text


def test_a_model_without_tokenizer_refuses_structured_output(tiny_llama):
    bare = LLM(str(tiny_llama[0]), device="cpu")
    with pytest.raises(RequestError, match="structured output needs the model's tokenizer"):
        bare.generate([[1, 2, 3]], params(StructuredOutputsParams(regex="a")))


def test_a_tokenizer_larger_than_the_model_refuses_structured_output_and_plain_requests_still_run(
        tiny_llama, smollm2_tokenizer_dir):
    small = LLM(str(tiny_llama[0]), device="cpu", tokenizer=str(smollm2_tokenizer_dir))   # 320 logits, 49,152 tokens
    with pytest.raises(RequestError, match="its tokenizer has 49152 tokens but the model scores only 320"):
        small.generate([[1, 2, 3]], params(StructuredOutputsParams(regex="a")))
    assert len(small.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids) == 3
