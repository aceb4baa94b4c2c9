"""End-to-end engine behaviour on a tiny random Llama, with transformers' greedy output as the reference."""
from __future__ import annotations

import pytest
import torch

from ondo import LLM, SamplingParams
from ondo.engine.engine import RequestError
from ondo.loader.hf import ModelLoadError

PROMPTS = [[1, 5, 9, 33, 4], list(range(10, 47)), [7] * 17, list(range(100, 164))]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    _, hf_model = tiny_llama
    outputs = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def run(folder, **options):
    llm = LLM(str(folder), dtype="float32", **options)
    return llm, [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def assert_no_leak(llm):
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == stats["num_requests"] == 0


def test_batched_greedy_matches_transformers(tiny_llama, reference):
    llm, tokens = run(tiny_llama[0])
    assert tokens == reference
    assert_no_leak(llm)


def test_alone_equals_batched(tiny_llama, reference):
    llm = LLM(str(tiny_llama[0]), dtype="float32")
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    assert alone == reference


def test_chunked_prefill_with_small_budget(tiny_llama, reference):
    # 16 tokens a step: every prompt but the first is split over several steps.
    llm, tokens = run(tiny_llama[0], max_num_batched_tokens=16, block_size=8)
    assert tokens == reference
    assert_no_leak(llm)


def test_chunked_prefill_off(tiny_llama, reference):
    llm, tokens = run(tiny_llama[0], enable_chunked_prefill=False, max_num_batched_tokens=16)
    assert tokens == reference


def test_preemption_when_blocks_run_out(tiny_llama, reference):
    # 12 blocks of 8 tokens: the four requests need 16 blocks at their longest, so some must be
    # preempted and recomputed -- with outputs unchanged.
    block_bytes = 2 * 2 * 2 * 16 * 4 * 8   # K+V, layers, kv heads, head_dim, float32, block_size
    llm, tokens = run(tiny_llama[0], block_size=8, kv_cache_memory_bytes=12 * block_bytes, max_model_len=96)
    assert llm.engine.stats()["num_preemptions"] > 0
    assert tokens == reference
    assert_no_leak(llm)


def test_prefix_cache_hit_gives_same_output(tiny_llama, reference):
    llm = LLM(str(tiny_llama[0]), dtype="float32")
    first = llm.generate([PROMPTS[3]], GREEDY)[0]
    again = llm.generate([PROMPTS[3]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == 48                   # 3 full blocks of 16 of the 64-token prompt
    assert llm.engine.stats()["prefix_cache_hits"] >= 48
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == reference[3]


def test_prefix_caching_off_never_hits(tiny_llama):
    llm = LLM(str(tiny_llama[0]), dtype="float32", enable_prefix_caching=False)
    llm.generate([PROMPTS[3]], GREEDY)
    assert llm.generate([PROMPTS[3]], GREEDY)[0].num_cached_tokens == 0


def test_bad_requests_are_clear_errors_and_engine_keeps_serving(tiny_llama, reference):
    llm = LLM(str(tiny_llama[0]), dtype="float32", max_model_len=64)
    with pytest.raises(RequestError, match="prompt is empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(RequestError, match=r"token ids must be in \[0, 320\), got 320"):
        llm.generate([[1, 320]], GREEDY)
    with pytest.raises(RequestError, match="prompt has 64 tokens; max_model_len is 64"):
        llm.generate([list(range(64))], GREEDY)
    with pytest.raises(RequestError, match=r"prompt \(50 tokens\) plus max_tokens \(24\) .* context \(64 tokens\)"):
        llm.generate([list(range(50))], GREEDY)
    with pytest.raises(RequestError, match="no tokenizer"):
        llm.generate(["text needs a tokenizer"], GREEDY)
    assert_no_leak(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], GREEDY)] == reference[:3]


def test_one_bad_prompt_in_a_batch_leaves_engine_clean(tiny_llama):
    llm = LLM(str(tiny_llama[0]), dtype="float32")
    with pytest.raises(RequestError):
        llm.generate([PROMPTS[0], []], GREEDY)
    assert_no_leak(llm)


def test_abort_frees_blocks(tiny_llama):
    llm = LLM(str(tiny_llama[0]), dtype="float32")
    engine = llm.engine
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.add_request("b", PROMPTS[2], SamplingParams(max_tokens=5, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leak(llm)


def test_missing_and_malformed_model_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="model not found"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        LLM(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        LLM(str(tmp_path))


def test_kv_cache_too_small_for_max_model_len(tiny_llama):
    with pytest.raises(RequestError, match="fewer than max_model_len"):
        LLM(str(tiny_llama[0]), dtype="float32", kv_cache_memory_bytes=4096, max_model_len=256)
