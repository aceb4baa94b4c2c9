"""The one-row GEMV of dense half-precision weights (ondo/layers/dense_gemv.py), run by Triton's
interpreter on the CPU where Triton is installed; tests/gpu/test_dense_gemv_gpu.py runs it on a GPU."""
from __future__ import annotations

from tests.triton_interpreter import assert_passes_in_triton_interpreter

_INTERPRETED = r"""
import torch
from ondo.layers.dense_gemv import gemv
torch.manual_seed(0)
# K a multiple of the 1024-input block or not, N odd (a half-used program), with and without a bias.
for n, k, dtype, with_bias in [(6, 2048, torch.bfloat16, False), (7, 1024, torch.float16, True),
                               (5, 1500, torch.bfloat16, True), (3, 160, torch.float16, False)]:
    weight = torch.randn(n, k).to(dtype)
    x = torch.randn(1, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    reference = x.double() @ weight.double().t() + (bias.double() if with_bias else 0)
    got = gemv(x, weight, bias)
    assert got.shape == (1, n) and got.dtype == dtype, (got.shape, got.dtype)
    # summed in float32; the one rounding is to the half-precision output
    assert (got.double() - reference).abs().max() <= 8e-3 * reference.abs().max(), (n, k, dtype, with_bias)
# A weight whose rows are a slice of a wider matrix (row stride > K).
wide = torch.randn(4, 3000).to(torch.bfloat16)
x = torch.randn(1, 2048).to(torch.bfloat16)
reference = x.double() @ wide[:, :2048].double().t()
assert (gemv(x, wide[:, :2048]).double() - reference).abs().max() <= 8e-3 * reference.abs().max()
# gated: W = [gate | up] (rows c and c + I in one program); act(gate) * up equals the activation applied to
# the ungated output (rounded first), within one float16 step (exp2 against torch's silu / tanh). In float16:
# the interpreter rounds to float16 to nearest (numpy), but truncates to bfloat16.
import torch.nn.functional as F
ACTS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}
for n, k, dtype, with_bias in [(6, 2048, torch.float16, False), (10, 1500, torch.float16, True)]:
    weight = torch.randn(n, k).to(dtype)
    x = (torch.randn(1, k) * 0.05).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    gate, up = gemv(x, weight, bias).float().chunk(2, dim=1)
    for name, act in ACTS.items():
        expected = (act(gate).to(dtype).float() * up).to(dtype).float()
        got = gemv(x, weight, bias, gated=name)
        assert got.shape == (1, n // 2) and got.dtype == dtype, (got.shape, got.dtype)
        assert ((got.float() - expected).abs() <= 2 ** -9 * expected.abs() + 1e-6).all(), (name, n, k)
print("ok")
"""


def test_gemv_in_the_triton_interpreter():
    assert_passes_in_triton_interpreter(_INTERPRETED)
