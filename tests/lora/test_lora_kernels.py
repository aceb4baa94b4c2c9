"""The grouped multi-LoRA Triton kernels (ondo/lora/triton_ops.py) against the per-token reference,
run by Triton's interpreter on the CPU (float32: the interpreter's bf16 dots are not a reference).
tests/gpu/test_lora_gpu.py runs them compiled, in bf16 and inside CUDA graphs."""
from __future__ import annotations

from tests.triton_interpreter import assert_passes_in_triton_interpreter

_INTERPRETED = r"""
import torch
from ondo.lora.layers import add_lora_reference, token_spans
from ondo.lora.triton_ops import TokenGroups, add_lora, lora_expand, lora_shrink

generator = torch.Generator().manual_seed(0)
# (slots per token, K, N, width): one decode token; a mixed batch over every slot with base rows between;
# K over several splits with a ragged end; more tokens of one slot than one tile; nothing to do; a
# prefill-sized step, whose groups' row tiles are spread over several programs.
cases = [([2], 96, 40, 16), ([0, -1, 3, 3, 1, -1, 2, 0, 1], 1100, 70, 48), ([1] * 21 + [-1, 0], 130, 300, 24),
         ([-1, -1], 64, 32, 16), ([t % 3 - (t % 7 == 0) for t in range(1100)], 80, 40, 16)]
for slots, k, n, width in cases:
    a = torch.randn(4, width, k, generator=generator) * 0.1     # [L, W, K]
    b = torch.randn(4, n, width, generator=generator) * 0.1     # [L, N, W]
    x = torch.randn(len(slots), k, generator=generator)
    out = torch.randn(len(slots), n, generator=generator)
    groups = TokenGroups(4, 2048, torch.device("cpu"))
    groups.write(token_spans(slots, [1] * len(slots)))   # one token per sequence, as in decode
    got = add_lora(x, a, b, groups, out.clone())
    expected = add_lora_reference(x, a, b, slots, out)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max(), (slots, k, n, width)
    base_rows = [t for t, slot in enumerate(slots) if slot < 0]
    assert torch.equal(got[base_rows], out[base_rows]), slots   # rows of no slot are untouched
    # The delta alone (written, not added), as decode graphs compute it beside the base product.
    for summed in (False, True):
        delta = lora_expand(lora_shrink(x, a, groups, summed=summed), b, groups, torch.zeros_like(out), accumulate=False)
        assert (delta - (expected - out)).abs().max() < 1e-4 * expected.abs().max(), (slots, k, n, width, summed)
print("ok")
"""


def test_grouped_kernels_in_the_triton_interpreter():
    assert_passes_in_triton_interpreter(_INTERPRETED)
