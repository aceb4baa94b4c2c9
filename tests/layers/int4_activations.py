"""The activations ondo's CPU int4 product multiplies, for tests that compare it with exact products."""
from __future__ import annotations

import torch

from ondo.layers import cpu_kernels


def activations_seen(x: torch.Tensor, layer) -> torch.Tensor:
    """x as ondo's int4 product multiplies it, in float64: on CPUs where it rounds activations (int4_mm.c,
    ROUNDED_X), each group of a row's inputs to 16-bit integers q = round(x * (32767 / max|x|)) times
    max|x| / 32767, in the kernel's float32 steps; elsewhere (or on torch's path) x itself."""
    if not (cpu_kernels.usable(x) and cpu_kernels.int4_rounds_activations()):
        return x.double()
    inputs = 16 if layer.padded16 else layer.group
    groups = x.float().reshape(x.shape[0], -1, inputs)
    top = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(top > 0, 32767.0 / top, torch.zeros_like(top))
    q = torch.round(groups * inverse)                                            # half to even, as lrintf
    return (q.double() * (top / 32767.0).double()).reshape(x.shape)
