"""On CUDA, async scheduling (ondo/engine/in_flight.py) gives token-for-token the synchronous path's
greedy outputs: a batch of different lengths finishing at different steps by
max_tokens and by stop tokens (which, like EOS, are only known once the token is on the host).

Run on a GPU machine: `pytest -q tests/gpu` (skipped without CUDA).
"""
from __future__ import annotations

import pytest
import torch

from ondo import LLM, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(overlapped, synchronous) LLMs over one random Qwen3-shaped bf16 model."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from transformers import AutoModelForCausalLM, Qwen3Config

    path = tmp_path_factory.mktemp("qwen3-async")
    config = Qwen3Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, vocab_size=4096, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    options = dict(dtype="bfloat16", max_model_len=1024, max_num_seqs=8, kv_cache_memory_bytes=1 << 30)
    fast, sync = LLM(str(path), **options), LLM(str(path), async_scheduling=False, **options)
    assert fast.engine.async_scheduling, "CUDA graphs should turn async scheduling on"
    return fast, sync


def prompts():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 4096, (n,), generator=generator).tolist() for n in (7, 100, 333, 64, 1, 250)]


def summary(outputs):
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outputs]


def assert_no_leak(llm):
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_requests"] == 0


def test_staggered_max_tokens_match_sync(engines):
    fast, sync = engines
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 80, 33, 1, 64, 17)]
    before = fast.engine.num_steps_launched_ahead
    assert summary(fast.generate(prompts(), params)) == summary(sync.generate(prompts(), params))
    assert fast.engine.num_steps_launched_ahead - before > 60
    assert_no_leak(fast)


def test_stop_tokens_at_different_steps_match_sync(engines):
    fast, sync = engines
    free = sync.generate(prompts(), SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))
    # Each request stops on the token it generates at its own step; two also have a max_tokens stop.
    positions, limits = (3, 40, 12, 0, 70, 25), (80, 80, 10, 80, 50, 80)
    params = [SamplingParams(temperature=0, max_tokens=limit, ignore_eos=True, stop_token_ids=[o.outputs[0].token_ids[i]])
              for o, i, limit in zip(free, positions, limits)]
    engine = fast.engine
    launched_ahead, not_sampled = engine.num_steps_launched_ahead, engine.num_rows_not_sampled
    expected = summary(sync.generate(prompts(), params))
    assert len({len(tokens) for tokens, _, _ in expected}) >= 4
    assert summary(fast.generate(prompts(), params)) == expected
    print(f"steps launched ahead: {engine.num_steps_launched_ahead - launched_ahead}, "
          f"rows of stopped requests not sampled: {engine.num_rows_not_sampled - not_sampled}")
    assert engine.num_steps_launched_ahead - launched_ahead > 20   # the longest request runs 30+ steps
    assert engine.num_rows_not_sampled > not_sampled
    assert_no_leak(fast)
