"""RMSNorm (Llama, Qwen) and its Gemma variant, with the residual add folded in."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ondo.engine.forward_context import fused_ops_enabled
from ondo.layers import cpu_kernels, fused


class RMSNorm(nn.Module):
    """y = x / rms(x) * (offset + weight), computed in float32 like transformers.

    Gemma stores `weight` as a delta from 1 (offset=1.0); Llama and Qwen store the scale itself.
    With `residual`, computes x = x + residual first and returns (normed, x): the pre-norm block pattern.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if offset else torch.ones(hidden_size))
        self.eps, self.offset = eps, offset

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offset and x.is_cpu and x.dtype != torch.float32 and x.dtype == self.weight.dtype:
            # bf16/fp16 on a CPU (packed weights): torch's fused op normalises in float32 and rounds once,
            # as the steps below do (the same bits), in one op instead of seven: ~8 us a call on a CPU.
            return F.rms_norm(x, x.shape[-1:], None, self.eps).mul_(self.weight)
        x32 = x.float()
        inv_rms = x32.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()   # [T, 1]
        # In place where the tensor is our own copy: fewer allocations, the same roundings.
        normed = x32 * inv_rms if x32 is x else x32.mul_(inv_rms)
        if self.offset:  # Gemma multiplies in float32 before casting back
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        out = normed.to(x.dtype)
        if out is normed or out.dtype != self.weight.dtype:
            return self.weight * out
        return out.mul_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda and fused_ops_enabled():
            return fused.rms_norm(x, self.weight, self.eps, residual, self.offset)
        if x.dtype == self.weight.dtype and cpu_kernels.usable(x):   # one call instead of up to nine ops
            return cpu_kernels.rms_norm(x, self.weight, self.eps, residual, self.offset)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
