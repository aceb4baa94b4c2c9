"""Rotary position embeddings with Hugging Face's frequency schedules (default, linear, llama3, yarn, ...).

cos/sin are computed once per forward from the flat positions and shared by every layer.
`apply_rotary` is the reference (transformers' formula); `apply_rotary_` computes the same numbers in
place on the qkv output with half the tensor ops, from tables (`rotation_tables`) built once per forward.
"""
from __future__ import annotations

import torch
from torch import nn

from ondo.layers import cpu_kernels


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
        if self.attention_scaling == 1.0:   # the common case: two multiplications by one skipped
            return emb.cos().to(dtype), emb.sin().to(dtype)
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


def rotation_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rot_dim] -> (cos, signed sin) [T, 1, 2, rot_dim // 2] for `apply_rotary_`.

    The signed sin has its first half negated: rotate_half(x) * sin == swap_halves(x) * signed_sin,
    exactly (a negation never rounds), so each layer skips rotate_half's neg and cat."""
    num_tokens, half = sin.shape[0], sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return cos.view(num_tokens, 1, 2, half), signed_sin.view(num_tokens, 1, 2, half)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotates x [T, heads * head_dim] in place (x may be a view with a row stride, like the q|k part of the
    qkv output); cos / signed_sin from `rotation_tables`. Each product is rounded to x's dtype before the
    sum, as in `apply_rotary`, so both give identical numbers."""
    num_tokens, half = x.shape[0], cos.shape[-1]
    if (x.dim() == 2 and x.stride(1) == 1 and cos.dtype == x.dtype and cpu_kernels.usable(x)
            and cos.is_contiguous() and signed_sin.is_contiguous()):
        cpu_kernels.rotary_(x, cos, signed_sin, head_dim)   # one call instead of four ops
        return x
    if 2 * half == head_dim:
        halves = x.view(num_tokens, -1, 2, half)                               # [T, heads, 2, D / 2]
    else:   # partial rotary: the first 2 * half dims of every head turn, the rest are kept
        halves = x.view(num_tokens, -1, head_dim)[..., :2 * half].unflatten(-1, (2, half))
    swapped = halves.flip(-2)                                                  # [T, heads, 2, half] (a copy)
    swapped.mul_(signed_sin)
    halves.mul_(cos).add_(swapped)
    return x
