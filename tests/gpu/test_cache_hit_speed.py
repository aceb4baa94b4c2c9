"""A prefix-cache hit never slows decoding (issue: the first hit took 1.19 s against 0.43 s fresh).

The cause was the attention kernels being specialized on the block-table width (Triton specializes
integer arguments by == 1 and % 16): a cache hit or a new prompt length compiled a new variant in the
middle of serving. After the engine's warm-up, no request shape compiles an attention kernel, and a
fully cached prompt reuses its blocks and compiles nothing. (How fast
is the benchmarks' business: `benchmarks/serving.py` and `latency.py`, not a timed test.)

Run on a GPU machine: `pytest -q tests/gpu` (skipped without CUDA).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from ondo import LLM, SamplingParams

pytestmark = pytest.mark.gpu

KERNEL_MODULES = ["ondo.layers.attention.triton_cache", "ondo.layers.attention.triton_decode",
                  "ondo.layers.attention.triton_prefill", "ondo.layers.fused"]


def compiled_variants() -> dict[str, int]:
    """How many compiled variants each Triton kernel of ondo holds, over all devices."""
    import triton

    counts = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr in dir(module):
            kernel = getattr(module, attr)
            if isinstance(kernel, triton.runtime.jit.JITFunction):
                counts[f"{name}.{attr}"] = sum(len(cache[0]) for cache in kernel.device_caches.values())
    return counts


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from transformers import AutoModelForCausalLM, Qwen3Config

    path = tmp_path_factory.mktemp("qwen3-cache-hit")
    config = Qwen3Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, vocab_size=4096, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    return LLM(str(path), dtype="bfloat16", max_model_len=2048, max_num_seqs=8, kv_cache_memory_bytes=1 << 30)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 4096, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_no_attention_kernel_compiles_after_warm_up(llm):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate([prompt(37, 0)], params)   # the first variants of every kernel (other shapes, other seeds below)
    before = compiled_variants()
    for length, seed in [(512, 1), (512, 1), (300, 2), (300, 2), (17, 3), (1000, 4), (1000, 4), (33, 5)]:
        llm.generate([prompt(length, seed)], params)                      # fresh, then a cache hit
    llm.generate([prompt(n, 10 + n) for n in (5, 64, 129, 700)], params)   # a mixed batch
    after = compiled_variants()
    grown = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    assert not grown, f"kernels compiled new variants mid-serving: {grown}"


def test_a_cached_prompt_reuses_its_blocks_and_compiles_nothing(llm):
    params = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0)
    llm.generate([prompt(512, 99)], SamplingParams(max_tokens=8, ignore_eos=True))   # warm
    before = compiled_variants()
    for seed in range(20, 23):
        tokens = prompt(512, seed)
        fresh = llm.generate([tokens], params)[0].outputs[0].token_ids
        hits_before = llm.engine.block_manager.prefix_hits
        cached = llm.generate([tokens], params)[0].outputs[0].token_ids
        assert llm.engine.block_manager.prefix_hits - hits_before == 496   # all but the last block
        assert len(fresh) == len(cached) == 64
    assert compiled_variants() == before
