"""max_tokens=0 with prompt_logprobs: the engine computes the prompt, samples nothing, and returns
every prompt token's log-prob -- transformers' log-softmax of the same prompt (float32, 1e-4)."""
from __future__ import annotations

import pytest
import torch

from ondo import LLM, SamplingParams, SamplingParamsError

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def llm(tiny_llama):
    # A small step budget splits the longer prompts into chunks, which must score the same.
    return LLM(str(tiny_llama[0]), dtype="float32", max_num_batched_tokens=16, block_size=16)


def reference(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()   # [len(ids), vocab]
    return logits.log_softmax(dim=-1)


def test_score_only_matches_transformers_and_generates_nothing(llm, tiny_llama):
    prompts = [[1, 17, 40, 7, 99, 3], [1] + [(7 * i) % 300 + 5 for i in range(40)]]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=3))
    for ids, output in zip(prompts, outputs):
        completion = output.outputs[0]
        assert completion.token_ids == [] and completion.text == "" and completion.finish_reason == "length"
        assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(ids)
        expected = reference(tiny_llama[1], ids)
        for position, (token, scores) in enumerate(zip(ids[1:], output.prompt_logprobs[1:])):
            assert scores[token].logprob == pytest.approx(expected[position, token].item(), abs=TOLERANCE)
            top = expected[position].topk(3)
            ranked = sorted((lp.rank, tid) for tid, lp in scores.items() if lp.rank is not None)
            assert [tid for _, tid in ranked] == top.indices.tolist()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks   # every block given back


def test_score_only_beside_generating_requests(llm):
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=0)
    generating = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    alone = llm.generate([[1, 50, 60, 70]], generating)[0].outputs[0].token_ids
    outputs = llm.generate([[1, 2, 3, 4, 5], [1, 50, 60, 70], [9, 8, 7]], [scoring, generating, scoring])
    assert [len(o.outputs[0].token_ids) for o in outputs] == [0, 5, 0]
    assert outputs[1].outputs[0].token_ids == alone


def test_max_tokens_0_needs_prompt_logprobs():
    with pytest.raises(SamplingParamsError, match="max_tokens must be >= 1, got 0"):
        SamplingParams(max_tokens=0)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0
