"""The one-row GEMV of dense weights (ondo/layers/dense_gemv.py) on a GPU: against float64 on the
projection shapes of small and large models, inside a CUDA graph, and chosen by `Linear` only in a
fused forward (enforce_eager keeps F.linear)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024), (28672, 4096), (4096, 14336),
          (896, 4864), (1001, 1000)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_matches_float64(n, k, dtype):
    from ondo.layers.dense_gemv import gemv

    generator = torch.Generator(device="cuda").manual_seed(n + k)
    weight = (torch.randn(n, k, device="cuda", generator=generator) * 0.02).to(dtype)
    x = torch.randn(1, k, device="cuda", generator=generator).to(dtype)
    bias = torch.randn(n, device="cuda", generator=generator).to(dtype)
    reference = x.double() @ weight.double().t() + bias.double()
    torch.full((4 * n,), float("nan"), dtype=dtype, device="cuda")   # an unwritten output shows as NaN
    got = gemv(x, weight, bias)
    assert torch.isfinite(got).all()
    assert (got.double() - reference).abs().max() <= 8e-3 * reference.abs().max()
    cublas = torch.nn.functional.linear(x, weight, bias)   # the same rounding class as cuBLAS
    assert (got.double() - reference).abs().max() <= 2 * (cublas.double() - reference).abs().max() + 1e-6


def test_gemv_inside_a_cuda_graph():
    from ondo.layers.dense_gemv import gemv

    weight = torch.randn(3000, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    gemv(x, weight)   # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv(x, weight)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, gemv(x, weight), rtol=0, atol=0)


def test_linear_takes_the_gemv_for_one_row_in_a_fused_forward_only(monkeypatch):
    from ondo.engine.forward_context import ForwardContext, set_forward_context
    from ondo.layers import dense_gemv
    from ondo.layers.linear import Linear

    calls = []
    real = dense_gemv.gemv
    monkeypatch.setattr(dense_gemv, "gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            layer = Linear(256, 96, bias=True)
        finally:
            torch.set_default_dtype(torch.float32)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    one, two = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    plain = layer(one)                                       # no forward context: F.linear
    with set_forward_context(ForwardContext(None, [], None, use_fused_ops=True)):
        fused_one, fused_two = layer(one), layer(two)
    with set_forward_context(ForwardContext(None, [], None, use_fused_ops=False)):   # enforce_eager
        layer(one)
    assert calls == [(1, 256)]
    torch.testing.assert_close(fused_one, plain, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_two, torch.nn.functional.linear(two, layer.weight, layer.bias))
