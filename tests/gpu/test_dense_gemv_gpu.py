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


@pytest.mark.parametrize("n,k", [(2 * 14336, 4096), (2 * 3072, 1024), (2 * 4864, 896)])
def test_gated_gemv_equals_the_product_then_the_activation_kernel(n, k):
    """A [gate | up] matrix's one-row product applying the activation itself (the MLP's fused decode path)
    gives the bits of the product followed by the fused activation kernel."""
    from ondo.layers import fused
    from ondo.layers.dense_gemv import gemv

    weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for b in (None, bias):
        product = gemv(x, weight, b)
        torch.testing.assert_close(gemv(x, weight, b, gated="silu"), fused.silu_and_mul(product), rtol=0, atol=0)
        gelu = gemv(x, weight, b, gated="gelu_tanh").float()
        expected = fused.gelu_tanh_and_mul(product).float()   # the compiler may contract g + c g^3 here: 1 step
        assert ((gelu - expected).abs() <= 2 ** -7 * expected.abs() + 1e-6).all()


def test_mlp_decode_row_applies_the_activation_in_the_product(monkeypatch):
    """LlamaMLP on one row in a fused forward: one gated product, the same bits as product + activation."""
    from types import SimpleNamespace

    from ondo.engine.forward_context import ForwardContext, set_forward_context
    from ondo.layers import dense_gemv
    from ondo.models.llama import LlamaMLP

    config = SimpleNamespace(hidden_size=512, intermediate_size=1536, hidden_act="silu")
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            mlp = LlamaMLP(config)
    finally:
        torch.set_default_dtype(torch.float32)
    for linear in (mlp.gate_up_proj, mlp.down_proj):
        linear.weight.data.normal_(0, 0.05)
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    calls = []
    real = dense_gemv.gemv
    monkeypatch.setattr(dense_gemv, "gemv", lambda *a, **kw: calls.append(kw.get("gated")) or real(*a, **kw))
    with set_forward_context(ForwardContext(None, [], None, use_fused_ops=True)):
        fused_out = mlp(x)
        assert calls == ["silu", None]
        unfused = mlp.down_proj(mlp.act(mlp.gate_up_proj(x)))
    torch.testing.assert_close(fused_out, unfused, rtol=0, atol=0)


def test_linear_takes_the_gemv_for_one_row_in_a_fused_forward_only(monkeypatch):
    from ondo.engine.forward_context import ForwardContext, set_forward_context
    from ondo.layers import dense_gemv
    from ondo.layers.linear import Linear

    calls = []
    real = dense_gemv.gemv
    monkeypatch.setattr(dense_gemv, "gemv", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
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
