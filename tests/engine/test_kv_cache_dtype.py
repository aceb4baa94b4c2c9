"""kv_cache_dtype: the KV cache's element type, chosen at start-up ("auto") or by the user."""
from __future__ import annotations

import pytest
import torch

from ondo import LLM
from ondo.config import ConfigError, EngineConfig
from ondo.engine.engine import resolve_kv_cache_dtype
from ondo.layers import cpu_kernels
from tests.layers.test_gguf_packed import assert_same_greedy, greedy
from tests.tokenizer.model_files import smollm2_gguf_path

CPU = torch.device("cpu")


def test_auto_is_float16_only_for_quantized_weights_with_float32_activations_on_the_cpu(tiny_llama):
    dense = LLM(str(tiny_llama[0]), dtype="float32").engine
    assert dense.runner.spec.dtype == torch.float32                 # the exact reference of transformers
    auto = EngineConfig(kv_cache_dtype="auto")
    packed = LLM(max_model_len=256).engine                          # the built-in Q4_1 GGUF
    want = torch.float16 if cpu_kernels.library() is not None else torch.float32
    assert (packed.dtype, packed.runner.spec.dtype) == (torch.float32, want)
    assert resolve_kv_cache_dtype(auto, torch.bfloat16, CPU, packed.model) == torch.bfloat16
    assert resolve_kv_cache_dtype(auto, torch.bfloat16, torch.device("cuda"), packed.model) == torch.bfloat16
    assert resolve_kv_cache_dtype(auto, torch.float32, torch.device("cuda"), packed.model) == torch.float32
    spec = packed.runner.spec                                       # 2 bytes an element in float16
    assert spec.bytes_per_token() == 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * want.itemsize

def test_a_chosen_dtype_is_kept_on_the_cpu_and_must_match_the_activations_on_a_gpu(tiny_llama):
    llm = LLM(str(tiny_llama[0]), dtype="float32", kv_cache_dtype="bfloat16")
    assert llm.engine.runner.spec.dtype == torch.bfloat16
    model = llm.engine.model
    for name in ("float32", "float16", "bfloat16"):
        assert resolve_kv_cache_dtype(EngineConfig(kv_cache_dtype=name), torch.float32, CPU, model) == getattr(torch, name)
    cuda = torch.device("cuda")
    assert resolve_kv_cache_dtype(EngineConfig(kv_cache_dtype="bfloat16"), torch.bfloat16, cuda, model) == torch.bfloat16
    with pytest.raises(ConfigError, match=r"kv_cache_dtype 'float16' needs the CPU: on cuda the cache is in the "
                                          r"activations' dtype \(bfloat16\); use 'auto'"):
        resolve_kv_cache_dtype(EngineConfig(kv_cache_dtype="float16"), torch.bfloat16, cuda, model)


@pytest.mark.parametrize("value", ["fp8", "half", None, 16])
def test_an_unknown_dtype_is_a_clear_error(value):
    with pytest.raises(ConfigError, match=r"kv_cache_dtype must be one of \('auto', 'float32', 'bfloat16', "
                                          r"'float16'\), got"):
        EngineConfig(kv_cache_dtype=value)


@pytest.mark.slow
@pytest.mark.skipif(cpu_kernels.library() is None, reason="float16 is auto's choice with ondo's CPU kernels")
def test_builtin_model_with_a_float16_cache_generates_what_float32_does():
    """The default float16 cache against a float32 one: the same greedy tokens on 5 prompts x 64 tokens
    up to proven near-ties, and log-probabilities within 0.01 where they agree."""
    path = smollm2_gguf_path()
    half = greedy(LLM(str(path), max_model_len=256), logprobs=5)
    full = greedy(LLM(str(path), max_model_len=256, kv_cache_dtype="float32"), logprobs=5)
    assert_same_greedy(half, full, "float16 cache", 0.01)
