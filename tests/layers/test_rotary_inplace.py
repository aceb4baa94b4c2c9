"""The in-place rotation the unfused layers run (`apply_rotary_` on `rotation_tables`) gives exactly the
numbers of the reference formula (`apply_rotary`, transformers' q * cos + rotate_half(q) * sin)."""
from __future__ import annotations

import pytest
import torch

from ondo.layers.rotary import apply_rotary, apply_rotary_, rotation_tables

HEAD_DIM, Q_HEADS, KV_HEADS = 16, 4, 2


def _cos_sin(num_tokens: int, rot_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(100, 100 + num_tokens).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = positions[:, None] * inv_freq[None]                                  # [T, rot_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rot_dim", [HEAD_DIM, HEAD_DIM // 2])
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_in_place_rotation_matches_reference_on_the_qkv_view(dtype, rot_dim, num_tokens):
    torch.manual_seed(0)
    q_size, kv_size = Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size).to(dtype)                # [T, q | k | v]
    cos, sin = _cos_sin(num_tokens, rot_dim, dtype)
    want = apply_rotary(qkv[:, :q_size + kv_size], cos, sin, HEAD_DIM)
    got = qkv.clone()
    apply_rotary_(got[:, :q_size + kv_size], *rotation_tables(cos, sin), HEAD_DIM)   # a view with a row stride
    torch.testing.assert_close(got[:, :q_size + kv_size], want, rtol=0, atol=0)
    torch.testing.assert_close(got[:, q_size + kv_size:], qkv[:, q_size + kv_size:], rtol=0, atol=0)  # v untouched
