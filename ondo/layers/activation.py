"""Gated activations over a merged [gate | up] projection: act(gate) * up."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ondo.engine.forward_context import fused_ops_enabled
from ondo.layers import cpu_kernels, fused

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}


def get_activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


# The names the fused kernels (and the products that apply the activation themselves) know them by.
_KERNEL_NAMES = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                 "gelu_fast": "gelu_tanh"}
_FUSED = {"silu": fused.silu_and_mul, "gelu_tanh": fused.gelu_tanh_and_mul}   # by kernel name


class GatedActivation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.act = get_activation(name)
        self.kernel_name = _KERNEL_NAMES.get(name)
        self.fused = _FUSED.get(self.kernel_name)

    def of_projection(self, gate_up_proj, x: torch.Tensor) -> torch.Tensor:
        """act(gate) * up of the merged [gate | up] projection of x: on the GPU's fused path the product
        applies the activation itself where its method can (single-stream decode), one launch fewer."""
        if self.kernel_name is not None and x.is_cuda and fused_ops_enabled():
            out = gate_up_proj.gated(x, self.kernel_name)
            if out is not None:
                return out
        return self(gate_up_proj(x))

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and gate_up.is_cuda and fused_ops_enabled():
            return self.fused(gate_up)
        if self.kernel_name is not None and cpu_kernels.usable(gate_up):
            return cpu_kernels.gated(gate_up, gelu_tanh=self.kernel_name == "gelu_tanh")
        half = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :half], gate_up[..., half:]   # [T, I] each
        return self.act(gate).mul_(up)   # act() returns a fresh tensor: multiplying in place saves one
