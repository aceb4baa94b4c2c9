"""The int4 on-the-fly quantizer's choice of scale and minimum per group: never worse than plain min-max
rounding, clearly better on ordinary weights, and exact on weights that already lie on a 4-bit grid."""
from __future__ import annotations

import pytest
import torch

from ondo.layers.quantization.int4 import quantize_int4


def min_max_error(weight: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Squared error per group of rounding to the group's [min, max] split in 15 steps."""
    groups = weight.view(weight.shape[0], -1, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    codes = ((groups - low) / scale).round().clamp(0, 15)
    return (codes * scale + low - groups).square().sum(-1)                        # [N, G]


def test_never_worse_than_min_max_and_better_overall():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    ours = (quantize_int4(weight).dequantize() - weight).square().view(256, -1, 32).sum(-1)   # [N, G]
    reference = min_max_error(weight)
    assert torch.all(ours <= reference * (1 + 1e-5) + 1e-12)
    assert ours.sum() < 0.85 * reference.sum()   # the refitted scales: about a quarter less on Gemma 3 270M


def test_weights_on_a_narrower_grid_are_recovered_exactly():
    """A group using only levels 1..15 of a 4-bit grid is not spread over [min, max] in 15 steps, but
    one of the grid widths tried (14 steps) fits it exactly."""
    generator = torch.Generator().manual_seed(1)
    levels = torch.randint(1, 16, (64, 128), generator=generator).float()
    levels[:, ::32] = 1
    levels[:, 1::32] = 15                                       # every group spans exactly 14 steps
    scale = torch.rand(64, 4, generator=generator)[..., None] * 0.01 + 0.001
    weight = (levels.view(64, 4, 32) * scale - 0.05).view(64, 128)
    affine = quantize_int4(weight)
    assert torch.allclose(affine.dequantize(), weight, atol=1e-6)


def test_large_matrices_are_fitted_in_row_chunks():
    weight = torch.randn(2500, 64, generator=torch.Generator().manual_seed(2))
    whole, by_rows = quantize_int4(weight), [quantize_int4(weight[i:i + 500]) for i in range(0, 2500, 500)]
    assert torch.equal(whole.codes, torch.cat([p.codes for p in by_rows]))
    assert torch.equal(whole.scale, torch.cat([p.scale for p in by_rows]))


def test_group_must_divide_the_inputs():
    with pytest.raises(ValueError, match="groups of 32 inputs, but this layer has 48 inputs"):
        quantize_int4(torch.zeros(4, 48))
