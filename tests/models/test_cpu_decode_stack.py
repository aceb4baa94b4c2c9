"""A CPU decode step's layers in one C call (ondo/models/cpu_decode.py) give the eager forward's numbers
bit for bit: the same kernels in the same order. The eager path is the reference the rest of the suite
checks against transformers."""
from __future__ import annotations

import pytest
import torch

from ondo import LLM, SamplingParams
from ondo.layers import cpu_kernels
from ondo.models import cpu_decode
from tests.models.tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler to build the CPU kernels")
PROMPTS = [[5, 17, 42, 8], [9, 3, 11], [100, 200, 300, 44, 55, 66, 77, 88, 99, 12], [7]]
STACK_RUN = cpu_decode._DecodeStack.run


def run(llm: LLM, monkeypatch, stacked: bool) -> tuple[list, int]:
    """Greedy tokens and top-3 log-probabilities of every prompt at once, and how many steps ran stacked."""
    calls = []

    def counted(self, *args):
        result = STACK_RUN(self, *args)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(cpu_decode._DecodeStack, "run", counted if stacked else lambda self, *args: None)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    outputs = [out.outputs[0] for out in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]
    return [(o.token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.logprobs]) for o in outputs], sum(calls)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])   # rope scaling; sliding window; q/k/v bias
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stacked_decode_equals_the_eager_forward(tmp_path, monkeypatch, family, dtype):
    build_tiny_model(family, tmp_path)
    llm = LLM(str(tmp_path), quantization="int4", dtype=dtype, max_model_len=128)
    eager, _ = run(llm, monkeypatch, stacked=False)
    stacked, steps = run(llm, monkeypatch, stacked=True)
    assert steps >= 11                         # every decode step after the prompts' prefill
    assert stacked == eager


def test_the_builtin_model_decodes_stacked(monkeypatch):
    """The real GGUF model (Q4_1 layers, a two-plane Q8_0 embedding as its LM head), several sequences."""
    from tests.conftest import builtin_gguf_path

    llm = LLM(str(builtin_gguf_path()), max_model_len=128)
    eager, _ = run(llm, monkeypatch, stacked=False)
    stacked, steps = run(llm, monkeypatch, stacked=True)
    assert steps >= 11 and stacked == eager


@pytest.mark.parametrize("case", ["dense", "qwen3", "disabled", "enforce_eager"])
def test_what_the_stack_does_not_compute_stays_eager(tmp_path, monkeypatch, case):
    """Dense weights, a family with per-head norms, the kernels switched off and enforce_eager keep the
    eager path."""
    build_tiny_model("qwen3" if case == "qwen3" else "llama", tmp_path)
    llm = LLM(str(tmp_path), quantization=None if case == "dense" else "int4", max_model_len=128,
              enforce_eager=case == "enforce_eager")
    if case == "disabled":
        monkeypatch.setattr(cpu_kernels, "_enabled", False)
    _, steps = run(llm, monkeypatch, stacked=True)
    assert steps == 0
    assert not llm.engine.model.model.__dict__.get("cpu_decode_stack") or case in ("disabled", "enforce_eager")
