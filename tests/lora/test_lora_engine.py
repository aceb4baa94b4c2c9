"""The slot pool (LRU, waiting for a slot), prefix-cache separation, QLoRA over NF4, merge-lora,
and the errors a user can cause."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ondo import LLM, LoRARequest, SamplingParams
from ondo.cli import main
from ondo.config import ConfigError
from ondo.engine.block_manager import BlockManager
from ondo.engine.request import Request
from ondo.layers.linear import linear_layers
from ondo.lora import LoRAError
from tests.lora.adapters import base_and_adapters, greedy_reference, save_random_adapter
from tests.models.tiny_models import build_tiny_model

PROMPT = [5, 9, 33, 7, 12, 40, 3]
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def three_adapters(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lora")
    base, adapters = base_and_adapters(tmp_path, "llama", count=3)
    return base, [LoRARequest(f"a{i}", i + 1, str(folder)) for i, (folder, _) in enumerate(adapters)]


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_slots_evict_least_recently_used_and_requests_wait_for_a_slot(three_adapters):
    base, loras = three_adapters
    reference = LLM(str(base), dtype="float32", device="cpu", enable_lora=True, max_loras=3)
    expected = [_tokens(reference.generate([PROMPT], GREEDY, lora_request=lora))[0] for lora in loras]

    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True, max_loras=2)
    manager = llm.engine.lora_manager
    # Three adapters, two slots, one batch: the third request waits until a slot frees up.
    assert _tokens(llm.generate([PROMPT] * 3, GREEDY, lora_request=loras)) == expected
    assert manager.slot_users == [0, 0]
    llm.generate([PROMPT], GREEDY, lora_request=loras[0])
    llm.generate([PROMPT], GREEDY, lora_request=loras[1])
    resident = {adapter.name for adapter in manager.slot_adapter}
    assert resident == {"a0", "a1"}
    # a0 is the least recently used: a2 takes its slot, a1 stays.
    assert _tokens(llm.generate([PROMPT], GREEDY, lora_request=loras[2])) == [expected[2]]
    assert {adapter.name for adapter in manager.slot_adapter} == {"a1", "a2"}


def test_a_slot_held_by_a_running_request_is_not_evicted(three_adapters):
    base, loras = three_adapters
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True, max_loras=1)
    engine = llm.engine
    engine.add_request("long", PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), loras[0])
    engine.add_request("other", PROMPT, GREEDY, loras[1])
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["long"]
    assert [r.request_id for r in engine.scheduler.waiting] == ["other"]
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert set(finished) == {"long", "other"} and all(o.outputs[0].finish_reason == "length" for o in finished.values())


def test_prefix_cache_never_shares_blocks_between_adapters(three_adapters):
    base, loras = three_adapters
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True, max_loras=2)
    prompt = list(range(3, 3 + 40))                 # two full blocks of 16 and a tail
    alone = [_tokens(LLM(str(base), dtype="float32", device="cpu", enable_lora=True,
                         enable_prefix_caching=False).generate([prompt], GREEDY, lora_request=lora))[0]
             for lora in (loras[0], loras[1], None)]
    stats = llm.engine.stats
    for lora, expected in zip((loras[0], loras[1], None), alone):
        hits = stats()["prefix_cache_hits"]
        assert _tokens(llm.generate([prompt], GREEDY, lora_request=lora)) == [expected]
        assert stats()["prefix_cache_hits"] == hits     # nothing shared across adapters or with the base
    llm.generate([prompt], GREEDY, lora_request=loras[1])
    hits = stats()["prefix_cache_hits"]
    assert _tokens(llm.generate([prompt], GREEDY, lora_request=loras[1])) == [alone[1]]
    assert stats()["prefix_cache_hits"] == hits + 32    # the same adapter reuses its own blocks


def test_block_hash_chain_starts_from_the_adapter():
    blocks = BlockManager(16, 4)
    requests = [Request(str(i), str(i), 0, list(range(9)), GREEDY, 5, 0, frozenset(), frozenset(), [],
                        lora_request=lora)
                for i, lora in enumerate([None, LoRARequest("a", 1, "/x"), LoRARequest("b", 2, "/y")])]
    for request in requests:
        assert blocks.allocate(request, 9)
        request.num_computed_tokens = 9
        blocks.cache_full_blocks(request)
    hashes = [tuple(r.block_hashes) for r in requests]
    assert len(set(hashes)) == 3 and all(len(h) == 2 for h in hashes)


def test_qlora_over_nf4_matches_peft_over_the_same_nf4_weights(tmp_path):
    base, [(folder, peft_model)] = base_and_adapters(tmp_path, "llama")
    # a float32 cache (auto takes float16 for quantized weights), so that any difference is the LoRA path's
    llm = LLM(str(base), dtype="float32", device="cpu", quantization="nf4", enable_lora=True, kv_cache_dtype="float32")
    assert any(layer.method.name != "dense" for _, layer in linear_layers(llm.engine.model))
    _copy_dequantized_weights(llm.engine.model, peft_model)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0)
    output = llm.generate([PROMPT], params, lora_request=LoRARequest("q", 1, str(folder)))[0].outputs[0]
    tokens, logits = greedy_reference(peft_model, PROMPT, 5)
    assert output.token_ids == tokens
    expected = torch.log_softmax(logits, dim=-1)
    for step, token in enumerate(tokens):
        assert output.logprobs[step][token].logprob == pytest.approx(float(expected[step, token]), abs=1e-4)


def _copy_dequantized_weights(ondo_model, peft_model) -> None:
    """PEFT's base gets the weights ondo's NF4 layers hold, dequantized, so both add the adapter to
    the same base and any difference is the LoRA path's."""
    hf_model = peft_model.base_model.model
    split = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    with torch.no_grad():
        for name, layer in linear_layers(ondo_model):
            weight = layer.method.dense_weight(layer).float()
            prefix, _, leaf = name.rpartition(".")
            parts = split.get(leaf, [leaf])
            for part, rows in zip(parts, weight.split(layer.out_sizes)):
                module = hf_model.get_submodule(f"{prefix}.{part}" if prefix else part)
                getattr(module, "base_layer", module).weight.copy_(rows)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_lora_folder_generates_what_the_adapter_does(tmp_path, family, capsys):
    base, [(folder, _)] = base_and_adapters(tmp_path, family)
    merged = tmp_path / "merged"
    assert main(["merge-lora", str(base), str(folder), str(merged)]) == 0
    with_adapter = LLM(str(base), dtype="float32", device="cpu", enable_lora=True).generate(
        [PROMPT], GREEDY, lora_request=LoRARequest("a", 1, str(folder)))
    assert _tokens(LLM(str(merged), dtype="float32", device="cpu").generate([PROMPT], GREEDY)) == _tokens(with_adapter)


def test_cli_generate_with_lora(three_adapters, capsys):
    base, loras = three_adapters
    expected = LLM(str(base), dtype="float32", device="cpu", enable_lora=True).generate(
        ["w5 w9 w33"], GREEDY, lora_request=loras[0])[0].outputs[0].text
    assert main(["generate", str(base), "w5 w9 w33", "--lora", loras[0].lora_path, "--dtype", "float32",
                 "--device", "cpu", "--temperature", "0", "--max-tokens", "5", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


# ---- errors ----------------------------------------------------------------------------------------

def test_errors_name_the_adapter_and_the_problem(tmp_path, three_adapters):
    base, loras = three_adapters
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=4)
    with pytest.raises(LoRAError, match=r"lora 'a0' has rank 8, more than max_lora_rank \(4\)"):
        llm.generate([PROMPT], GREEDY, lora_request=loras[0])
    other = build_tiny_model("llama", tmp_path / "wide", hidden_size=32, head_dim=8)
    save_random_adapter(other, tmp_path / "wide-lora", seed=1, rank=4, targets=["q_proj"])
    with pytest.raises(LoRAError, match=r"lora 'w': q_proj A is \[4, 32\] but the base's q_proj takes 64 inputs"):
        llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("w", 9, str(tmp_path / "wide-lora")))
    head = build_tiny_model("llama", tmp_path / "head")
    save_random_adapter(head, tmp_path / "head-lora", seed=2, rank=4, targets=["q_proj"])
    weights = tmp_path / "head-lora" / "adapter_model.safetensors"
    save_file({k.replace("q_proj", "rope_proj"): v for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(LoRAError, match=r"lora 'h': target module 'rope_proj' \(model.layers.0.self_attn.rope_proj\) "
                                        r"cannot be mapped onto this model: ondo adds LoRA to q_proj"):
        llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("h", 10, str(tmp_path / "head-lora")))
    with pytest.raises(LoRAError, match="not a PEFT adapter folder"):
        llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("x", 11, str(tmp_path)))
    assert not llm.engine.has_unfinished_requests()
    plain = LLM(str(base), dtype="float32", device="cpu")
    with pytest.raises(LoRAError, match="enable_lora=True"):
        plain.generate([PROMPT], GREEDY, lora_request=loras[0])
    with pytest.raises(ValueError, match="lora_int_id must be an int >= 1, got 0"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ConfigError, match="max_lora_rank must be in \\[1, 512\\], got 0"):
        LLM(str(base), enable_lora=True, max_lora_rank=0)
    with pytest.raises(ValueError, match="got 2 lora_requests for 1 prompts"):
        llm.generate([PROMPT], GREEDY, lora_request=[None, None])
    config = json.loads((tmp_path / "head-lora" / "adapter_config.json").read_text())
    (tmp_path / "head-lora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoRAError, match="DoRA"):
        llm.generate([PROMPT], GREEDY, lora_request=LoRARequest("d", 12, str(tmp_path / "head-lora")))


def test_steps_name_the_graph_set_with_lora_kernels_only_when_a_token_uses_an_adapter(three_adapters):
    base, _ = three_adapters
    llm = LLM(str(base), enable_lora=True, max_loras=2)
    manager = llm.engine.lora_manager
    manager.write_token_slots([-1, -1], [3, 1])
    assert manager.step_variant() == "base" and manager.state.groups == []
    manager.write_token_slots([-1, 1, -1, 1], [2, 1, 1, 1])
    assert manager.step_variant() == "lora"
    [(slot, rows)] = manager.state.groups
    assert slot == 1 and rows.tolist() == [2, 4]
    with manager.state.graph_variant(False):
        assert manager.step_variant() == "base"
    assert manager.step_variant() == "lora"   # the step's grouping survives a capture
