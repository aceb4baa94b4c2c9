"""Rotary position embeddings with Hugging Face's frequency schedules (default, linear, llama3, yarn, ...).

cos/sin are computed once per forward from the flat positions and shared by every layer.
"""
from __future__ import annotations

import torch
from torch import nn


def rope_inverse_frequencies(config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [rot_dim // 2], attention_scaling) exactly as transformers computes them."""
    params = config.rope_parameters
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        rot_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, layer_type: str | None = None):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inverse_frequencies(config, head_dim, layer_type)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, rot_dim] in `dtype` (neox layout: the half frequencies repeated)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]   # [T, rot_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x [T, heads * head_dim]; rotates the first rot_dim dims of every head (partial rotary keeps the rest)."""
    num_tokens = x.shape[0]
    x = x.view(num_tokens, -1, head_dim)                             # [T, heads, D]
    rot_dim = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]                      # [T, 1, rot_dim]
    if rot_dim == head_dim:
        out = x * cos + rotate_half(x) * sin
    else:
        rot, keep = x[..., :rot_dim], x[..., rot_dim:]
        out = torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)
    return out.reshape(num_tokens, -1)
