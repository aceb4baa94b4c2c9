"""RMSNorm's torch path on the CPU rounds where transformers' LlamaRMSNorm rounds: in bfloat16/float16 it
takes torch's fused `rms_norm` (one op instead of seven), which must give the same bits as the float32
steps. (ondo's CPU kernel, which sums the squares in another order, is tested in test_cpu_kernels.py.)"""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ondo.layers import cpu_kernels
from ondo.layers.norm import RMSNorm


@pytest.fixture(autouse=True)
def torch_path():
    with cpu_kernels.disabled():
        yield


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [64, 576, 4096])
def test_rms_norm_matches_transformers_bits(dtype, hidden):
    torch.manual_seed(hidden)
    reference = LlamaRMSNorm(hidden, eps=1e-5)
    reference.weight.data = torch.randn(hidden) * 0.3 + 1
    reference = reference.to(dtype)
    ours = RMSNorm(hidden, eps=1e-5).to(dtype)
    ours.weight.data.copy_(reference.weight.data)
    for scale in (1e-2, 1.0, 50.0):
        x = (torch.randn(7, hidden) * scale).to(dtype)
        residual = torch.randn(7, hidden).to(dtype)
        assert torch.equal(ours(x), reference(x)), scale
        normed, summed = ours(x, residual)
        assert torch.equal(summed, x + residual) and torch.equal(normed, reference(x + residual)), scale
