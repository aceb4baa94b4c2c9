"""The CUDA layout of 4-bit planes (`int4_gpu.py`), built on the CPU: words and scales decode to the
same weights as the codes they came from, for every plane count and group size, K padded or not;
GGUF layers repacked a chunk of rows at a time equal the whole-matrix packing; and the Triton kernels
(run by Triton's interpreter where Triton is installed) equal the dequantized matrix."""
from __future__ import annotations

import pytest
import torch

from ondo.layers.linear import Linear, linear_method_scope
from ondo.layers.quantization.int4_gpu import pack_words, padded_k, unpack_words
from ondo.layers.quantization.int4_planes import AffineCodes, Int4PlanesMethod
from tests.triton_interpreter import assert_passes_in_triton_interpreter


class PassThroughCodes(Int4PlanesMethod):
    """Takes `AffineCodes` as they are (the GPU tests share it)."""

    def to_codes(self, layer, tensor):
        return tensor


def random_affine(n: int, k: int, group: int, bits: int, seed: int = 0) -> AffineCodes:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=g) * 0.01 + 1e-3
    minimum = -scale * 2 ** (bits - 1) + torch.randn(n, k // group, generator=g) * 1e-3
    return AffineCodes(codes, scale, minimum, group, bits)


def gpu_layout_layer(affine: AffineCodes) -> Linear:
    n, k = affine.codes.shape
    with linear_method_scope(lambda layer: PassThroughCodes()):
        layer = Linear(k, n)
    layer.gpu_layout = True          # what a CUDA run device sets; the packing itself is plain torch
    layer.load("weight", affine)
    layer.finish_loading()
    return layer


def decode_words(layer: Linear) -> torch.Tensor:
    """Dense [N, K] float32 from the CUDA layout, the planes summed (the kernels' arithmetic in torch)."""
    codes = unpack_words(layer.qweight).float()                                       # [N, P*K_pad]
    n = codes.shape[0]
    sz = layer.scales_and_zeros.float().transpose(0, 1)                               # [N, P*G, 2]
    groups = codes.view(n, -1, layer.group)
    w = (groups - 8) * sz[..., 0:1] + sz[..., 1:2]                                    # [N, P*G, g]
    return w.view(n, layer.planes, -1).sum(1)[:, :layer.in_features]


def test_words_round_trip():
    codes = torch.randint(0, 16, (70, 384), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    words = pack_words(codes)
    assert words.shape == (48, 70) and words.dtype == torch.int32
    assert torch.equal(unpack_words(words), codes)
    # word i of block b holds input 128 b + 16 j + i in nibble j
    assert (int(words[16 + 3, 5]) >> 8) & 15 == int(codes[5, 128 + 2 * 16 + 3])


@pytest.mark.parametrize("group,bits,k", [(32, 4, 256), (32, 4, 160), (16, 6, 208), (32, 8, 96),
                                          (128, 4, 384), (256, 4, 256), (64, 5, 192)])
def test_gpu_layout_decodes_to_the_codes_weights(group, bits, k):
    affine = random_affine(70, k, group, bits)
    layer = gpu_layout_layer(affine)
    planes = 1 if bits <= 4 else 2
    assert layer.qweight.shape == (planes * padded_k(k, group) // 8, 70)
    assert layer.planes == planes and not layer.padded16
    torch.testing.assert_close(decode_words(layer), affine.dequantize(), rtol=0, atol=1e-5)


def test_gguf_chunked_repack_in_the_gpu_layout_equals_the_whole_matrix(monkeypatch):
    from gguf import GGMLQuantizationType as T

    from ondo.layers.quantization import gguf_blocks
    from ondo.layers.quantization.gguf_blocks import GGUFBlocks, decode_blocks
    from ondo.layers.quantization.int4_planes import concat_rows
    from tests.loader.test_gguf_repack import K, MIXED_PARTS, merged_layer
    from tests.layers.test_gguf_packed import random_blocks

    monkeypatch.setattr(gguf_blocks, "REPACK_ROWS", 64)   # several chunks, the last one partial
    raws = [random_blocks(kind, rows, K, seed=i) for i, (kind, rows) in enumerate(MIXED_PARTS)]
    layer = merged_layer(MIXED_PARTS, torch.float32)
    layer.gpu_layout = True
    for shard, ((kind, rows), raw) in enumerate(zip(MIXED_PARTS, raws)):
        layer.load("weight", GGUFBlocks(kind, (rows, K), raw), shard)
    layer.finish_loading()
    reference = merged_layer(MIXED_PARTS, torch.float32)
    reference.gpu_layout = True
    affine = concat_rows([decode_blocks(GGUFBlocks(kind, (rows, K), raw)) for (kind, rows), raw in zip(MIXED_PARTS, raws)])
    Int4PlanesMethod.store(reference.method, reference, affine)
    assert torch.equal(layer.qweight, reference.qweight)
    assert torch.equal(layer.scales_and_zeros, reference.scales_and_zeros)
    assert (layer.planes, layer.group, layer.k_eff) == (reference.planes, reference.group, reference.k_eff)
    torch.testing.assert_close(decode_words(layer), affine.dequantize(), rtol=0, atol=1e-5)
    assert T.Q6_K in [kind for kind, _ in MIXED_PARTS]           # groups of 16 stay unpadded


_INTERPRETED = r"""
import torch
from ondo.layers.quantization.int4_gpu_kernels import int4_dequant, int4_gemv, int4_mm
from tests.layers.test_int4_gpu_layout import decode_words, gpu_layout_layer, random_affine
for group, bits, k, m in [(32, 4, 160, 1), (16, 6, 208, 3), (128, 4, 384, 20), (32, 8, 96, 40)]:
    layer = gpu_layout_layer(random_affine(70, k, group, bits))
    dense = decode_words(layer)
    x = torch.randn(m, k)
    reference = x @ dense.t()
    blocks = layer.qweight.shape[0] * 8 // 128 // layer.planes
    for config in [None, (16, 32, 1, 4)] + ([(16, 32, 2, 4)] if blocks % 2 == 0 else []):
        got = int4_mm(x, layer.qweight, layer.scales_and_zeros, group, layer.planes, config)
        assert (got - reference).abs().max() < 1e-4 * reference.abs().max(), (group, bits, k, m, config)
    wt = int4_dequant(layer.qweight[:, 10:50], layer.scales_and_zeros[:, 10:50], group, k, layer.planes, torch.float32)
    assert torch.allclose(wt.t(), dense[10:50], atol=1e-6), (group, bits, k)
# The one-row kernel reads bf16 scales: compare against the weights those scales give, in float64.
# N = 70 is off every block width (masked columns); 128 is on them (unmasked loads).
for n, group, bits, k in [(70, 32, 4, 160), (70, 16, 6, 208), (70, 128, 4, 384), (70, 32, 8, 96), (70, 256, 4, 512),
                          (70, 64, 5, 256), (128, 32, 4, 256)]:
    layer = gpu_layout_layer(random_affine(n, k, group, bits))
    layer.scales_and_zeros = layer.scales_and_zeros.to(torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16)
    layer.scales_and_zeros, sz = layer.scales_and_zeros.float(), layer.scales_and_zeros
    reference = x.double() @ decode_words(layer).double().t()
    blocks = layer.qweight.shape[0] * 8 // 128 // layer.planes
    for config in [None, (32, 1, 1), (64, 1, 1)] + ([(32, 2, 1), (64, 2, 1)] if blocks % 2 == 0 else []):
        got = int4_gemv(x, layer.qweight, sz, group, layer.planes, config)
        # the partial sums are exact to float32; the one rounding is to bfloat16 at the end
        assert (got.double() - reference).abs().max() < 8e-3 * reference.abs().max(), (n, group, bits, k, config)
# Split K four ways: the last program of each tile adds the partials in split order, so the result is the
# same bits at every run, and every lock is back at zero afterwards.
from ondo.layers import split_k
layer = gpu_layout_layer(random_affine(70, 512, 32, 4))
sz = layer.scales_and_zeros.to(torch.bfloat16)
x = torch.randn(1, 512).to(torch.bfloat16)
runs = [int4_gemv(x, layer.qweight, sz, 32, 1, (32, 4, 1)) for _ in range(2)]
assert torch.equal(runs[0], runs[1]) and not split_k.locks(x.device, 1).any()
unsplit = int4_gemv(x, layer.qweight, sz, 32, 1, (32, 1, 1)).double()
assert (runs[0].double() - unsplit).abs().max() < 8e-3 * unsplit.abs().max()
xm = torch.randn(5, 512)
runs = [int4_mm(xm, layer.qweight, layer.scales_and_zeros, 32, 1, (16, 32, 4, 4)) for _ in range(2)]
assert torch.equal(runs[0], runs[1]) and not split_k.locks(x.device, 1).any()
print("ok")
"""


def test_kernels_in_the_triton_interpreter():
    assert_passes_in_triton_interpreter(_INTERPRETED)
