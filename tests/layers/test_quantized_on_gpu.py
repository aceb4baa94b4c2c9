"""int8, NF4 and GPTQ act-order layers built on a GPU: the same numbers as their CPU twins (storage moves
to the run device; every lookup and product runs there)."""
from __future__ import annotations

import pytest
import torch

from ondo.layers.linear import MergedLinear, linear_method_scope
from ondo.layers.quantization.gptq_awq import PackedInt4
from ondo.layers.quantization.int8 import Int8Method
from ondo.layers.quantization.nf4 import NF4Method
from ondo.layers.quantization.prequantized import CheckpointFormat, CheckpointMethod
from tests.layers.gptq_awq_writers import gptq_tensors, quantize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SIZES = [64, 32, 32]


def build(method_factory, device: str, dtype: torch.dtype) -> MergedLinear:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), linear_method_scope(lambda layer: method_factory()):
            return MergedLinear(128, SIZES, bias=False)
    finally:
        torch.set_default_dtype(previous)


def gptq_shards():
    order = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    shards = [quantize(torch.randn(n, 128, generator=torch.Generator().manual_seed(i)) * 0.05, 32,
                       (order // 32).numpy()) for i, n in enumerate(SIZES)]
    packed = []
    for q in shards:
        t = gptq_tensors(q)
        packed.append(PackedInt4("gptq", t["qweight"], t["qzeros"], t["scales"], 32, t["g_idx"], 1))
    return packed


FACTORIES = {
    "int8": (Int8Method, None),
    "nf4-double-quant": (lambda: NF4Method(double_quant=True), None),
    "gptq-act-order": (lambda: CheckpointMethod(CheckpointFormat("gptq", 32, 1)), gptq_shards),
}


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("num_tokens", [1, 40, 200])
def test_gpu_layer_equals_its_cpu_twin(name, num_tokens):
    factory, payloads = FACTORIES[name]
    weights = payloads() if payloads else [torch.randn(n, 128, generator=torch.Generator().manual_seed(i)) * 0.05
                                           for i, n in enumerate(SIZES)]
    layers = {}
    for device in ("cpu", "cuda"):
        layer = build(factory, device, torch.bfloat16)
        for i, w in enumerate(weights):
            layer.load("weight", w, i)
        layer.finish_loading()
        layers[device] = layer
    cpu, gpu = layers["cpu"], layers["cuda"]
    torch.testing.assert_close(gpu.method.dense_weight(gpu).cpu().float(), cpu.method.dense_weight(cpu).float(),
                               rtol=0, atol=0)
    x = torch.randn(num_tokens, 128, generator=torch.Generator().manual_seed(5)).bfloat16()
    expected = x.float() @ cpu.method.dense_weight(cpu).float().t()
    error = (gpu(x.cuda()).float().cpu() - expected).abs().max() / expected.abs().max()
    assert error < 2e-2, f"{name}: bfloat16 relative error {error:.2e}"


def test_int8_batches_above_the_kernel_limit_take_the_dense_product_of_the_dequantized_weights():
    """Above KERNEL_MAX_TOKENS rows an int8 layer is cuBLAS on its dequantized matrix: the very product
    of the dense layer holding `dense_weight`; at the limit the tensor-core kernel stays close to it."""
    import torch.nn.functional as F

    from ondo.layers.quantization.int8_triton import KERNEL_MAX_TOKENS

    layer = build(Int8Method, "cuda", torch.bfloat16)
    for i, n in enumerate(SIZES):
        layer.load("weight", torch.randn(n, 128, generator=torch.Generator().manual_seed(i)) * 0.05, i)
    layer.finish_loading()
    weight = layer.method.dense_weight(layer)
    x = torch.randn(KERNEL_MAX_TOKENS + 1, 128, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=0, atol=0)
    below = x[:KERNEL_MAX_TOKENS]
    torch.testing.assert_close(layer(below).float(), F.linear(below, weight).float(), rtol=2e-2, atol=2e-2)
