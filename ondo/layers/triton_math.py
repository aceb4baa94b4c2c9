"""Triton device functions shared by several kernels (imported only where Triton runs)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gated_value(gate, up, GELU_TANH: tl.constexpr):
    """act(gate) * up in float32, for gate / up already rounded to the activation dtype: the activation is
    computed in float32 and rounded to that dtype before the product, as the unfused modules round."""
    g = gate.to(tl.float32)
    if GELU_TANH:      # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh through exp2
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = g - g / (tl.exp2(inner * (2.0 * 1.4426950408889634)) + 1.0)
    else:              # silu: g * sigmoid(g)
        act = g / (1.0 + tl.exp2(-g * 1.4426950408889634))
    return act.to(gate.dtype).to(tl.float32) * up.to(tl.float32)
