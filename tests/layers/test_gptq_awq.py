"""GPTQ / AWQ int4 payloads: exact decoding of the published layouts, act-order, and the int4 kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ondo.layers.linear import MergedLinear, linear_method_scope
from ondo.layers.quantization.gptq_awq import PackedInt4
from ondo.layers.quantization.prequantized import CheckpointFormat, CheckpointMethod
from tests.layers.gptq_awq_writers import awq_tensors, gptq_tensors, quantize


pytestmark = pytest.mark.usefixtures("one_cpu_thread")   # tests/conftest.py


def dense(n, k, seed):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def act_order(k: int, group: int, seed: int) -> np.ndarray:
    """g_idx of a desc_act checkpoint: input k belongs to group (its position in a random order) // group."""
    position = np.random.default_rng(seed).permutation(k)
    return position // group


def payload(kind, q, group, v1=True):
    tensors = gptq_tensors(q, v1) if kind == "gptq" else awq_tensors(q)
    return PackedInt4(kind, tensors["qweight"], tensors["qzeros"], tensors["scales"], group,
                      tensors.get("g_idx"), 1 if kind == "gptq" and v1 else 0)


@pytest.mark.parametrize("kind,v1", [("gptq", True), ("gptq", False), ("awq", False)])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_decoding_is_exact(kind, v1, group):
    k = 256
    q = quantize(dense(48, k, 0), k if group == -1 else group)
    packed = payload(kind, q, group, v1)
    assert torch.equal(packed.dequantize(), q.dense())
    affine, perm = packed.to_affine()
    assert perm is None and torch.equal(affine.dequantize(), q.dense())


def test_act_order_permutes_inputs_exactly():
    k, group = 256, 32
    q = quantize(dense(40, k, 1), group, act_order(k, group, seed=1))
    packed = payload("gptq", q, group)
    assert torch.equal(packed.dequantize(), q.dense())
    affine, perm = packed.to_affine()
    assert perm is not None and torch.equal(affine.dequantize(), q.dense()[:, perm])


def merged_layer(dtype=torch.float32):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with linear_method_scope(lambda layer: CheckpointMethod(CheckpointFormat("gptq", 32, 1))):
            return MergedLinear(128, [64, 32, 32], bias=False)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 40])          # the CPU int4 kernel and dequantize + GEMM
def test_merged_gptq_layer_matches_dense(ordered, num_tokens):
    g_idx = act_order(128, 32, seed=2) if ordered else None   # q/k/v share the order of their common input
    shards = [quantize(dense(n, 128, 10 + i), 32, g_idx) for i, n in enumerate([64, 32, 32])]
    expected_weight = torch.cat([q.dense() for q in shards])
    for dtype in (torch.float32, torch.bfloat16):
        layer = merged_layer(dtype)
        for i, q in enumerate(shards):
            layer.load("weight", payload("gptq", q, 32), i)
        layer.finish_loading()
        assert layer.method.name == ("gptq+act-order" if ordered else "gptq")
        x = torch.randn(num_tokens, 128, generator=torch.Generator().manual_seed(3))
        expected = x @ expected_weight.t()
        if dtype == torch.float32:
            assert torch.equal(layer.method.dense_weight(layer), expected_weight)
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
        else:
            error = (layer(x.bfloat16()).float() - expected).abs().max() / expected.abs().max()
            assert error < 2e-2, f"bfloat16 relative error {error:.2e}"


def test_merged_act_order_shards_must_share_one_order():
    layer = merged_layer()
    for i, n in enumerate([64, 32, 32]):
        q = quantize(dense(n, 128, 20 + i), 32, act_order(128, 32, seed=i))
        layer.load("weight", payload("gptq", q, 32), i)
    with pytest.raises(ValueError, match="different input orders"):
        layer.finish_loading()


def test_group_size_must_divide_in_features():
    q = quantize(dense(32, 128, 0), 32)
    tensors = gptq_tensors(q)
    packed = PackedInt4("gptq", tensors["qweight"], tensors["qzeros"], tensors["scales"], 48, None, 1)
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 128"):
        packed.check()
