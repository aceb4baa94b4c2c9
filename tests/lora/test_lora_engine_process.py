"""The LoRA messages between the API server and the engine-core process: plain data that decodes
back to the same adapter (the end-to-end tests against `--engine-process` are in test_lora_server.py)."""
from __future__ import annotations

from ondo import LoRARequest, SamplingParams
from ondo.engine.core import messages as m


def test_an_add_request_carries_its_adapter_to_the_core():
    lora = LoRARequest("sql", 7, "/adapters/sql")
    sent = m.AddRequest("r1", [1, 2, 3], m.params_to_data(SamplingParams(max_tokens=4)), m.lora_to_data(lora))
    received = m.core_codec().decode(m.client_codec().encode(sent))
    assert isinstance(received, m.AddRequest)
    assert m.lora_from_data(received.lora) == lora
    base = m.core_codec().decode(m.client_codec().encode(m.AddRequest("r2", "hi", m.params_to_data(SamplingParams()))))
    assert base.lora is None and m.lora_from_data(base.lora) is None


def test_load_unload_and_their_reply_round_trip():
    core, client = m.core_codec(), m.client_codec()
    assert core.decode(client.encode(m.LoadLoRA(3, "a", "/x"))) == m.LoadLoRA(3, "a", "/x")
    assert core.decode(client.encode(m.UnloadLoRA(4, "a"))) == m.UnloadLoRA(4, "a")
    reply = m.LoRAReply(4, [m.LoRAData("b", 9, "/y")], removed=True)
    assert client.decode(core.encode(reply)) == reply
    failed = m.LoRAReply(5, [], error_type="LoRAError", message="lora 'c': not a PEFT adapter folder",
                         is_bad_adapter=True)
    assert client.decode(core.encode(failed)) == failed
