"""ondo with a PEFT LoRA adapter generates what transformers + PEFT generate, for every family."""
from __future__ import annotations

import pytest
import torch

from ondo import LLM, LoRARequest, SamplingParams
from tests.lora.adapters import base_and_adapters, greedy_reference
from tests.models.tiny_models import FAMILIES

PROMPT = [5, 9, 33, 7, 12, 40, 3]
MAX_TOKENS = 6


def _greedy(llm, prompts, loras):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    return llm.generate(prompts, params, lora_request=loras)


def _check_against(output, reference_model, prompt):
    tokens, logits = greedy_reference(reference_model, prompt, MAX_TOKENS)
    completion = output.outputs[0]
    assert completion.token_ids == tokens
    expected = torch.log_softmax(logits, dim=-1)
    for step, (token, position) in enumerate(zip(tokens, completion.logprobs)):
        assert position[token].logprob == pytest.approx(float(expected[step, token]), abs=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_and_base_in_one_batch_match_peft(tmp_path, family):
    base, [(folder, peft_model)] = base_and_adapters(tmp_path, family)
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True)
    with_lora, without = _greedy(llm, [PROMPT, PROMPT], [LoRARequest("a", 1, str(folder)), None])
    _check_against(with_lora, peft_model, PROMPT)
    with peft_model.disable_adapter():
        _check_against(without, peft_model, PROMPT)
    assert with_lora.outputs[0].token_ids != without.outputs[0].token_ids   # the adapter changes the output


def test_two_adapters_and_base_batched_equal_each_alone(tmp_path):
    base, adapters = base_and_adapters(tmp_path, "llama", count=2)
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True)
    loras = [LoRARequest(f"a{i}", i + 1, str(folder)) for i, (folder, _) in enumerate(adapters)]
    prompts = [PROMPT, PROMPT[:4] + [77, 78], PROMPT[2:]]
    batched = _greedy(llm, prompts, [loras[0], None, loras[1]])
    alone = [_greedy(llm, [prompt], [lora])[0] for prompt, lora in zip(prompts, [loras[0], None, loras[1]])]
    assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in alone]
    _check_against(batched[0], adapters[0][1], prompts[0])
    _check_against(batched[2], adapters[1][1], prompts[2])


def test_rslora_scaling(tmp_path):
    base, [(folder, peft_model)] = base_and_adapters(tmp_path, "qwen3", use_rslora=True, rank=4, alpha=6.0)
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True)
    _check_against(_greedy(llm, [PROMPT], LoRARequest("rs", 1, str(folder)))[0], peft_model, PROMPT)


def test_adapter_on_some_projections_only(tmp_path):
    """A LoRA on q_proj and v_proj only changes those rows of the merged q/k/v layer."""
    base, [(folder, peft_model)] = base_and_adapters(tmp_path, "llama", targets=["q_proj", "v_proj", "up_proj"])
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=8)
    _check_against(_greedy(llm, [PROMPT], LoRARequest("qv", 1, str(folder)))[0], peft_model, PROMPT)
