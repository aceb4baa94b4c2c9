"""int8 and NF4 weight-only formats: byte-for-byte against bitsandbytes' own CPU quantizers, and the
linear kernels (packed product, embedding rows, dense weight) against the dequantized matrix."""
from __future__ import annotations

import pytest
import torch

from ondo.layers.linear import Linear, MergedLinear, VocabEmbedding, linear_method_scope
from ondo.layers.quantization.int8 import Int8Method, Int8Rows, quantize_int8
from ondo.layers.quantization.nf4 import NF4Blocks, NF4Method, _quantize_dynamic, dynamic_map, quantize_nf4

bnb_functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 64), (96, 128), (37, 64), (320, 256)]        # 37 x 64: a block count not a multiple of 256
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")   # tests/conftest.py


def weight(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.05).to(dtype)


def build(cls, method, dtype, *args):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with linear_method_scope(lambda layer: method):
            return cls(*args)
    finally:
        torch.set_default_dtype(previous)


def torch_backend_quantize_blockwise(values: torch.Tensor, blocksize: int):
    """bitsandbytes' reference (pure torch) quantize_blockwise, bypassing its CPU C kernel."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    quantize_blockwise = torch.ops.bitsandbytes.quantize_blockwise.default
    return quantize_blockwise.redispatch(keys, values, bnb_functional.create_dynamic_map(), blocksize)


# --- int8 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_codes_and_scales_equal_bitsandbytes(dtype):
    w = weight((96, 128), dtype)
    w[5] = 0                                                   # an all-zero row stays zero
    codes, row_absmax, _ = bnb_functional.int8_vectorwise_quant(w.clone())
    ours = quantize_int8(w)
    assert torch.equal(ours.codes[torch.arange(96) != 5], codes[torch.arange(96) != 5])
    assert torch.equal(ours.codes[5], torch.zeros(128, dtype=torch.int8))
    torch.testing.assert_close(ours.scale, row_absmax * (1.0 / 127.0), rtol=0, atol=0)
    error = (ours.dequantize() - w.float()).abs().max(dim=1).values
    assert bool((error <= ours.scale * (0.5 + 1e-4)).all())    # rounding to the nearest step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 40])               # the CPU int8 kernel (bf16) and dequantize + GEMM
def test_int8_linear_matches_dequantized(dtype, num_tokens):
    sizes = [64, 32, 32]
    layer = build(MergedLinear, Int8Method(), dtype, 128, sizes, True)
    shards = [weight((n, 128), torch.float32, seed=i) for i, n in enumerate(sizes)]
    for i, shard in enumerate(shards):                        # each shard quantized as it arrives
        layer.load("weight", shard, i)
    layer.load("bias", torch.linspace(-1, 1, 128))
    layer.finish_loading()
    dense = torch.cat([quantize_int8(s).dequantize() for s in shards])
    assert torch.equal(layer.method.dense_weight(layer).float(), dense.to(dtype).float())
    x = torch.randn(num_tokens, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = x.float() @ dense.t() + torch.linspace(-1, 1, 128)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    error = (layer(x).float() - expected).abs().max() / expected.abs().max()
    assert error < tolerance, f"relative error {error:.2e}"


def test_int8_embedding_rows_and_prequantized_rows():
    w = weight((50, 64), torch.float32)
    layer = build(VocabEmbedding, Int8Method(), torch.float32, 50, 64)
    codes = quantize_int8(w)
    layer.load("weight", Int8Rows(codes.codes, codes.scale))  # a checkpoint's codes load as they are
    layer.finish_loading()
    ids = torch.tensor([0, 7, 49, 7])
    assert torch.equal(layer(ids), codes.dequantize()[ids])


def test_int8_missing_rows_are_reported():
    layer = build(MergedLinear, Int8Method(), torch.float32, 64, [32, 32], False)
    layer.load("weight", weight((32, 64), torch.float32), 0)
    with pytest.raises(ValueError, match="32 of 64 output rows were loaded"):
        layer.finish_loading()


# --- NF4 codec ----------------------------------------------------------------------------------------

def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nf4_bytes_and_absmax_equal_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.code, state.code)
    assert torch.equal(ours.dequantize().to(dtype), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nf4_double_quantization_equals_bitsandbytes_torch_backend(shape):
    w = weight(shape, torch.float32, seed=2)
    _, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    offset = state.absmax.mean()
    codes, nested_absmax = torch_backend_quantize_blockwise(state.absmax - offset, 256)
    ours = quantize_nf4(w, double_quant=True)
    assert torch.equal(ours.absmax, codes) and torch.equal(ours.nested_absmax, nested_absmax)
    assert ours.nested_offset == offset.item() and torch.equal(ours.nested_code, dynamic_map())


def test_nf4_double_quantization_against_the_cpu_c_kernel():
    """bitsandbytes' CPU C kernel searches the dynamic map approximately: near a midpoint between two
    levels it may pick the farther one. The 8-bit absmax codes then differ by one level, rarely; the
    4-bit codes never differ, and ondo decodes bitsandbytes' own state exactly as bitsandbytes does."""
    w = weight((1024, 256), torch.float32, seed=3)                        # 4096 blocks
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, double_quant=True)
    assert torch.equal(ours.packed, packed.view(-1))
    level_gap = (ours.absmax.int() - state.absmax.int()).abs()
    assert level_gap.max() <= 1 and level_gap.float().mean() < 0.01
    theirs = NF4Blocks(packed.view(-1), state.absmax, (1024, 256), 64, state.code, state.state2.absmax,
                       state.state2.code, state.offset.item())
    assert torch.equal(theirs.dequantize(), bnb_functional.dequantize_4bit(packed, state))


def test_fp4_checkpoint_table_decodes_like_bitsandbytes():
    w = weight((64, 128), torch.float32, seed=4)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="fp4")
    blocks = NF4Blocks(packed.view(-1), state.absmax, (64, 128), 64, state.code)
    assert torch.equal(blocks.dequantize(), bnb_functional.dequantize_4bit(packed, state))


def test_dynamic_quantization_rounds_to_the_nearest_level():
    values = torch.randn(700, generator=torch.Generator().manual_seed(5))
    codes, absmax = _quantize_dynamic(values)
    normed = values / absmax.repeat_interleave(256)[:700]
    distances = (normed[:, None] - dynamic_map()[None, :]).abs()                       # [700, 256]
    assert torch.equal(distances.gather(1, codes.long()[:, None])[:, 0], distances.min(dim=1).values)


# --- NF4 linear -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_matches_dequantized(double_quant, dtype):
    sizes = [64, 32, 32]
    layer = build(MergedLinear, NF4Method(double_quant=double_quant), dtype, 128, sizes, False)
    shards = [weight((n, 128), torch.float32, seed=10 + i) for i, n in enumerate(sizes)]
    for i, shard in enumerate(shards):
        layer.load("weight", shard, i)
    layer.finish_loading()
    # Each shard keeps its own state (a nested offset per shard with double quantization).
    dense = torch.cat([quantize_nf4(s, double_quant=double_quant).dequantize() for s in shards])
    assert torch.equal(layer.method.dense_weight(layer).float(), dense.to(dtype).float())
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = x.float() @ dense.to(dtype).float().t()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    error = (layer(x).float() - expected).abs().max() / expected.abs().max()
    assert error < tolerance, f"relative error {error:.2e}"
    rows = torch.tensor([0, 63, 64, 100, 127])
    assert torch.equal(layer.method.embed(layer, rows).float(), dense[rows].to(dtype).float())


def test_nf4_needs_rows_made_of_whole_blocks():
    layer = build(Linear, NF4Method(), torch.float32, 96, 8)
    with pytest.raises(ValueError, match="in_features must be a multiple of 64, got 96"):
        layer.load("weight", weight((8, 96), torch.float32))


_INT8_KERNEL_INTERPRETED = r"""
import torch
from ondo.layers import split_k
from ondo.layers.quantization.int8_triton import int8_mm
torch.manual_seed(0)
# K split 4 ways (512 inputs, few tiles), 2 ways and not at all: the last program of a tile adds the
# partials in split order, so two runs give the same bits and every lock is back at zero.
for m, n, k in [(3, 70, 512), (1, 200, 256), (20, 2000, 96)]:
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) * 0.01
    x = torch.randn(m, k).to(torch.float16)
    reference = x.double() @ (codes.double() * scale.double()[:, None]).t()
    runs = [int8_mm(x, codes, scale) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and not split_k.locks(x.device, 1).any()
    assert (runs[0].double() - reference).abs().max() <= 2e-3 * reference.abs().max(), (m, n, k)
# The one-row GEMV: every byte position, codes -127 and 127, N and K not multiples of the block, a row
# slice of a wider matrix (its rows strided), and a final block of K shorter than BLOCK_K. (float16:
# the interpreter does not round bfloat16 as a GPU does.)
from ondo.layers.quantization.int8_triton import int8_gemv
for n, k, config in [(70, 512, None), (13, 96, (8, 64, 4)), (16, 1000, (8, 256, 4)), (40, 4, (16, 64, 2))]:
    codes = torch.randint(-127, 128, (n, k + 8), dtype=torch.int8)
    codes[0, :4] = torch.tensor([-127, 127, -1, 0], dtype=torch.int8)
    codes = codes[:, 4:4 + k]
    scale = torch.rand(n) * 0.01
    x = torch.randn(1, k).to(torch.float16)
    reference = x.double() @ (codes.double() * scale.double()[:, None]).t()
    got = int8_gemv(x, codes, scale, config)
    assert got.dtype == torch.float16 and got.shape == (1, n)
    # float32 sums (error at most k 2^-24 of the sum of |x w|), then one rounding to float16 (2^-11)
    magnitude = x.double().abs() @ (codes.double() * scale.double()[:, None]).abs().t()
    assert ((got.double() - reference).abs() <= 2 ** -10 * reference.abs() + 2 ** -14 * magnitude).all(), \
        (n, k, config)
print("ok")
"""


def test_int8_gpu_kernel_in_the_triton_interpreter():
    from tests.triton_interpreter import assert_passes_in_triton_interpreter

    assert_passes_in_triton_interpreter(_INT8_KERNEL_INTERPRETED)
