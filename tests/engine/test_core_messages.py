"""The engine-core messages: every message survives msgpack and comes back equal; SamplingParams
crosses as plain data with every option family; logits processors cross by importable name."""
from __future__ import annotations

import dataclasses
import math

import msgspec
import pytest

from ondo.config import EngineConfig
from ondo.engine.core import messages as m
from ondo.engine.output_processor import SequenceDelta
from ondo.outputs import Logprob
from ondo.sampling_params import SamplingParams, SamplingParamsError


def ban_token_zero(token_ids, logits):
    """A module-level logits processor: importable by name from the core."""
    logits[0] = -math.inf
    return logits


def _round_trip_to_core(message):
    return m.core_codec().decode(msgspec.msgpack.encode(message))


def _round_trip_to_client(message):
    return m.client_codec().decode(msgspec.msgpack.encode(message))


def test_data_struct_has_every_sampling_params_init_field():
    init_fields = {f.name for f in dataclasses.fields(SamplingParams) if f.init}
    assert set(m.SamplingParamsData.__struct_fields__) == init_fields


@pytest.mark.parametrize("options", [
    {},
    {"n": 3, "best_of": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 7},
    {"typical_p": 0.8, "epsilon_cutoff": 0.01, "eta_cutoff": 0.02, "do_sample": True},
    {"presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3},
    {"stop": ["\n", "END"], "stop_token_ids": [2, 5], "include_stop_str_in_output": True, "ignore_eos": True},
    {"bad_words": ["foo"], "bad_words_ids": [[1, 2], [3]], "logit_bias": {"5": -100, 7: 2.5},
     "allowed_token_ids": [1, 2, 3]},
    {"max_tokens": None, "min_tokens": 2, "max_length": 50, "min_length": 10, "truncate_prompt_tokens": 8},
    {"max_tokens": 0, "prompt_logprobs": 2, "logprobs": 5},
    {"skip_special_tokens": False, "spaces_between_special_tokens": False, "detokenize": False},
    {"max_new_tokens": 9, "num_return_sequences": 2, "stop_strings": "x", "temperature": 0.5},
    {"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
    {"structured_outputs": {"regex": "[a-z]+"}},
    {"structured_outputs": {"choice": ["yes", "no"]}},
    {"structured_outputs": {"grammar": 'root ::= "a" | "b"'}},
    {"structured_outputs": {"json_object": True}},
    {"logits_processors": [ban_token_zero]},
])
def test_sampling_params_round_trip(options):
    params = SamplingParams(**options)
    message = m.AddRequest("r-1", [1, 2, 3], m.params_to_data(params))
    received = _round_trip_to_core(message)
    assert isinstance(received, m.AddRequest)
    assert received.request_id == "r-1" and received.prompt == [1, 2, 3]
    assert m.params_from_data(received.params) == params


def test_text_prompt_round_trip():
    message = m.AddRequest("r", "Hello", m.params_to_data(SamplingParams()))
    assert _round_trip_to_core(message).prompt == "Hello"


def test_logits_processor_crosses_by_name():
    data = m.params_to_data(SamplingParams(logits_processors=[ban_token_zero]))
    assert data.logits_processors == [f"{__name__}:ban_token_zero"]
    assert m.params_from_data(data).logits_processors == [ban_token_zero]


def test_a_lambda_processor_is_refused_at_add_time_naming_the_field():
    with pytest.raises(SamplingParamsError, match=r"logits_processors\[0\] must be a module-level function"):
        m.params_to_data(SamplingParams(logits_processors=[lambda ids, logits: logits]))


def test_a_nested_function_processor_is_refused():
    def local(ids, logits):
        return logits

    with pytest.raises(SamplingParamsError, match=r"logits_processors\[0\]"):
        m.params_to_data(SamplingParams(logits_processors=[local]))


def test_an_unimportable_processor_name_is_a_clear_error_in_the_core():
    data = m.params_to_data(SamplingParams())
    data.logits_processors = ["no_such_package.module:fn"]
    with pytest.raises(SamplingParamsError, match="no_such_package.module:fn"):
        m.params_from_data(data)
    data.logits_processors = ["math:pi"]
    with pytest.raises(SamplingParamsError, match="must name callables"):
        m.params_from_data(data)


def test_step_deltas_with_logprobs_round_trip():
    position = {3: Logprob(-0.25, 1), 9: Logprob(-math.inf, 2)}
    first = SequenceDelta("r-0", 1, [3], [position], -0.25, "stop", 7, num_cached_tokens=16,
                          prompt_logprobs=[None, {2: Logprob(-1.5, 4)}])
    running = SequenceDelta("r-0", 0, [5, 6])
    failed = SequenceDelta("r-1", 0, [], finish_reason="error", error="the logits processor failed",
                           error_is_input=True)
    message = m.CoreOutputs(added=["r-2"], deltas=[first, running, failed],
                            add_errors=[m.AddError("r-3", "QueueFullError", "full", False)],
                            stats={"num_running": 2, "kv_cache_usage": 0.5})
    received = _round_trip_to_client(message)
    assert received == message
    assert received.deltas[0].logprobs[0][9].logprob == -math.inf
    assert received.deltas[0].prompt_logprobs[1][2] == Logprob(-1.5, 4)


@pytest.mark.parametrize("message", [
    m.Ready("model.gguf", 2048, 49152, 1.5, {"model": None, "max_num_seqs": 64}, 1234),
    m.LoadFailed("ModelLoadError", "model not found: /x"),
    m.Dead("RuntimeError", "CUDA error"),
    m.CoreOutputs(),
])
def test_core_to_client_messages_round_trip(message):
    assert _round_trip_to_client(message) == message


@pytest.mark.parametrize("message", [m.Abort(["a", "b"]), m.StopSequences([("a", 0), ("b", 2)]), m.AbortAll(),
                                     m.Shutdown()])
def test_client_to_core_messages_round_trip(message):
    assert _round_trip_to_core(message) == message


def test_engine_config_crosses_as_json():
    config = EngineConfig(model="m.gguf", max_num_seqs=3, enable_lora=True, lora_modules=(("a", "/b"),))
    assert msgspec.json.decode(msgspec.json.encode(config), type=EngineConfig) == config


def test_a_message_cannot_carry_a_live_object():
    with pytest.raises(TypeError):
        msgspec.msgpack.encode(m.CoreOutputs(stats={"x": object()}))


class _FakeEngine:
    """The Engine's surface that EngineCore uses: requests wait until the fake runs them."""

    def __init__(self, max_num_seqs: int) -> None:
        self.config = EngineConfig(max_num_seqs=max_num_seqs)
        self.waiting: list[str] = []
        self.aborted: list[str] = []

    def stats(self) -> dict:
        return {"num_running": 0, "num_waiting": len(self.waiting)}

    def add_core_request(self, request_id, prompt, params) -> None:
        if prompt == "too long":
            from ondo.engine.engine import RequestError

            raise RequestError("the prompt does not fit")
        self.waiting.append(request_id)

    def abort_request(self, request_id) -> None:
        self.aborted.append(request_id)
        self.waiting.remove(request_id)


def _core(max_num_seqs: int, max_waiting: int | None):
    from ondo.engine.core.process import EngineCore

    sent: list = []
    engine = _FakeEngine(max_num_seqs)
    return EngineCore(engine, max_waiting, lambda message, client=None: sent.append(message)), engine, sent


def _add(request_id: str, prompt="hi", params: SamplingParams | None = None) -> m.AddRequest:
    return m.AddRequest(request_id, prompt, m.params_to_data(params or SamplingParams()))


def test_core_answers_adds_in_one_message_and_refuses_each_alone():
    core, engine, sent = _core(max_num_seqs=1, max_waiting=1)
    data = m.params_to_data(SamplingParams())
    data.logits_processors = ["no_such_module:f"]
    core.handle([_add("a"), _add("a"), _add("b", "too long"), m.AddRequest("c", "hi", data), _add("d"), _add("e")])
    (answer,) = [_round_trip_to_client(message) for message in sent]
    assert answer.added == ["a", "d"]   # "a" gets the free slot, "d" is the one allowed to wait
    errors = {e.request_id: (e.error_type, e.is_value_error) for e in answer.add_errors}
    assert errors == {"a": ("ValueError", True), "b": ("RequestError", True),
                      "c": ("SamplingParamsError", True), "e": ("QueueFullError", False)}
    assert answer.stats["num_waiting"] == 2


def test_core_abort_all_and_shutdown():
    core, engine, sent = _core(max_num_seqs=4, max_waiting=None)
    core.handle([_add("a"), _add("b"), m.Abort(["a", "unknown"])])
    assert engine.aborted == ["a"]
    core.handle([m.AbortAll()])
    assert engine.aborted == ["a", "b"] and not core.stopping
    core.handle([m.Shutdown()])
    assert core.stopping


def test_core_answers_each_api_server_process_and_aborts_only_its_requests():
    from ondo.engine.core.process import EngineCore

    sent: list = []
    engine = _FakeEngine(max_num_seqs=8)
    engine.lora_manager = None
    core = EngineCore(engine, None, lambda message, client=None: sent.append((client, message)), num_clients=2)
    add = lambda request_id, client: m.AddRequest(request_id, [1, 2], m.params_to_data(SamplingParams()),  # noqa: E731
                                                  client=client)
    core.handle([add("a", 0), add("b", 1), add("c", 1)])
    assert {client: message.added for client, message in sent} == {0: ["a"], 1: ["b", "c"]}
    sent.clear()
    core.handle([m.AbortAll(client=1)])
    assert engine.aborted == ["b", "c"] and core.running == {"a": 0}
    # every process hears of adapter changes; only the caller's reply keeps its call id
    sent.clear()
    core.handle([m.LoadLoRA(7, "x", "/nowhere", client=1)])
    replies = {client: message.call_id for client, message in sent if isinstance(message, m.LoRAReply)}
    assert replies == {1: 7, 0: -1}
