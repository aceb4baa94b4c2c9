"""int4 weight-only quantization of a dense folder while it loads: asymmetric, per group of 32 along K.

Each group's [min, max] is split into 15 steps (w ≈ scale * code + min, code in 0..15), the form of
gpt-fast's and torchao's int4 weight-only schemes; a group of 32 keeps a 135M-270M model within the
+5 % perplexity bound (benchmarks/quality.py). Storage and kernels are `Int4PlanesMethod`'s.
"""
from __future__ import annotations

import torch

from ondo.layers.linear import Linear
from ondo.layers.quantization.int4_planes import AffineCodes, Int4PlanesMethod

GROUP_SIZE = 32


def quantize_int4(weight: torch.Tensor, group: int = GROUP_SIZE) -> AffineCodes:
    """Dense [N, K] -> asymmetric 4-bit codes with a scale and minimum per group of `group`."""
    n, k = weight.shape
    if k % group:
        raise ValueError(f"int4 quantizes groups of {group} inputs, but this layer has {k} inputs "
                         f"(not a multiple of {group})")
    groups = weight.float().view(n, k // group, group)                               # [N, G, group]
    low, high = groups.amin(-1), groups.amax(-1)                                     # [N, G]
    scale = ((high - low) / 15).clamp_min(1e-10)
    codes = ((groups - low[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return AffineCodes(codes.view(n, k), scale, low, group, 4)


class Int4Method(Int4PlanesMethod):
    name = "int4"

    def to_codes(self, layer: Linear, tensor: torch.Tensor) -> AffineCodes:
        return quantize_int4(tensor)
