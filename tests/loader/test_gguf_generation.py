"""The real GGUF models generate what transformers generates from the same file (dequantized, float32).

ondo runs the file dequantized too (`quantization="none"`), the path transformers takes; that the packed
path equals this one is tests/layers/test_gguf_packed.py's job.

A divergence is allowed only at a near-tie that the test proves: transformers' top-2 logits at that
position differ by less than 1e-3; the tokens after it are not compared.
"""
from __future__ import annotations

import pytest
import torch

from ondo import LLM, SamplingParams
from tests.tokenizer.model_files import gemma3_gguf_path, smollm2_gguf_path

pytestmark = pytest.mark.slow
NEW_TOKENS = 48
NEAR_TIE = 1e-3

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "2 + 2 = ?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3 + 5?"}],
    [{"role": "user", "content": "List three fruits."}],
]
RAW_PROMPTS = ["The history of the Roman Empire", "def fibonacci(n):", "Once upon a time, in a small village,"]


def assert_same_greedy(ours: list[int], prompt_ids: list[int], reference) -> None:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
    assert len(ours) == len(ref) == NEW_TOKENS
    for position, (mine, theirs) in enumerate(zip(ours, ref)):
        if mine != theirs:
            with torch.inference_mode():
                logits = reference(torch.tensor([prompt_ids + ref[:position]])).logits[0, -1]
            top2 = logits.topk(2).values
            gap = (top2[0] - top2[1]).item()
            assert gap < NEAR_TIE and logits[mine] >= top2[1], f"diverged at {position} with a top-2 gap of {gap}"
            return


@pytest.fixture(scope="module")
def smollm2(smollm2_reference):
    return LLM(str(smollm2_gguf_path()), dtype="float32", quantization="none"), smollm2_reference


def test_builtin_model_answers_paris():
    out = LLM().chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


@pytest.mark.parametrize("chat", CHATS, ids=[f"chat{i}" for i in range(len(CHATS))])
def test_smollm2_greedy_matches_transformers(smollm2, chat):
    llm, reference = smollm2
    prompt_ids = llm.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    out = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert_same_greedy(out[0].outputs[0].token_ids, prompt_ids, reference)


def test_streamed_korean_on_the_real_model(smollm2):
    llm = smollm2[0]
    engine = llm.engine
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "한국어로 인사해 주세요. 안녕하세요!"}])
    engine.add_request("korean", prompt, SamplingParams(temperature=0.8, seed=3, max_tokens=60, ignore_eos=True,
                                                        logit_bias={}))
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            pieces.append(output.outputs[0].text_delta)
            final = output
    text = final.outputs[0].text
    assert "".join(pieces) == text == llm.tokenizer.decode(final.outputs[0].token_ids)
    assert "\ufffd" not in text


def test_gemma3_base_model_greedy_matches_transformers(gemma3_reference):
    path = gemma3_gguf_path()
    llm, reference = LLM(str(path), dtype="float32", quantization="none"), gemma3_reference
    assert llm.tokenizer.chat_template is None
    for prompt in RAW_PROMPTS:
        prompt_ids = llm.tokenizer.encode(prompt)
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))[0]
        assert out.prompt_token_ids == prompt_ids
        assert_same_greedy(out.outputs[0].token_ids, prompt_ids, reference)
    # A base model chats with the raw text of the messages.
    chat = llm.chat([{"role": "user", "content": RAW_PROMPTS[0]}], SamplingParams(temperature=0, max_tokens=8))[0]
    assert chat.prompt_token_ids == llm.tokenizer.encode(RAW_PROMPTS[0])
