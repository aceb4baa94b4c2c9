"""The GPU int4 kernels (`int4_gpu_kernels.py`) against the dequantized matrix, for every plane layout and batch
size, eagerly and replayed from a CUDA graph; GGUF layers and their embedding rows on the GPU against
their CPU twins; and a whole int4 model on the GPU against its CPU twin."""
from __future__ import annotations

import pytest
import torch

from ondo.layers.linear import Linear, linear_method_scope
from ondo.layers.quantization.int4 import Int4Method
from ondo.layers.quantization.int4_planes import AffineCodes
from tests.layers.test_int4_gpu_layout import PassThroughCodes, random_affine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def packed_layer(affine: AffineCodes, n: int, k: int) -> Linear:
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"), linear_method_scope(lambda layer: PassThroughCodes()):
            layer = Linear(k, n)
    finally:
        torch.set_default_dtype(torch.float32)
    layer.load("weight", affine)
    layer.finish_loading()
    return layer


@pytest.mark.parametrize("group,bits,k", [(32, 4, 1024), (32, 8, 1024), (16, 6, 1024), (128, 4, 1024),
                                          (32, 4, 576), (16, 6, 1040)])           # K padded to whole blocks
@pytest.mark.parametrize("num_tokens", [1, 5, 16, 32, 33, 64, 128])   # fused kernel, then dequantize + GEMM
def test_kernel_matches_dequantized(group, bits, k, num_tokens):
    n = 4096 + 64 * 3 + 32 + 5                # no multiple of any tile
    affine = random_affine(n, k, group, bits)
    layer = packed_layer(affine, n, k)
    x = torch.randn(num_tokens, k, device="cuda", dtype=torch.bfloat16)
    reference = x.float() @ affine.dequantize().cuda().t()
    got = layer(x).float()
    error = (got - reference).abs().max() / reference.abs().max()
    assert error < 1.5e-2, f"relative error {error:.2e}"


@pytest.mark.parametrize("num_tokens", [1, 4])      # the one-row kernel, then the fused tiles
def test_kernel_inside_a_cuda_graph(num_tokens):
    n, k = 2048, 2048
    layer = packed_layer(random_affine(n, k, 32, 4), n, k)
    x = torch.randn(num_tokens, k, device="cuda", dtype=torch.bfloat16)
    eager = layer(x)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        layer(x)                                 # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    # split K: the last program of a tile adds the partials in split order, so replays are bit-exact
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    assert not torch.equal(out, eager)


def test_int4_model_on_gpu_matches_cpu(tiny_llama):
    """Prompt log-probabilities of an int4 model: GPU (Triton kernel) equals CPU (torch's int4 kernel)."""
    from ondo import LLM, SamplingParams

    prompts = [[1, 5, 9, 33, 70, 12, 99], [2, 8, 100]]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    folder, _ = tiny_llama
    results = [LLM(str(folder), quantization="int4", dtype="bfloat16", device=device).generate(prompts, params)
               for device in ("cuda", "cpu")]
    for gpu, cpu, prompt in zip(*results, prompts):
        for position in range(1, len(prompt)):
            token = prompt[position]
            assert abs(gpu.prompt_logprobs[position][token].logprob - cpu.prompt_logprobs[position][token].logprob) < 0.05


@pytest.mark.parametrize("num_tokens", [1, 7, 100])
def test_gguf_layer_and_its_embedding_rows_equal_the_cpu_twin(num_tokens):
    """A merged layer of Q4_K, Q6_K (groups of 16, two planes) and Q8_0 rows, repacked in chunks into
    the GPU layout: products and embedding lookups equal the same file's layer on the CPU."""
    from ondo.layers.quantization.gguf_blocks import GGUFBlocks
    from tests.layers.test_gguf_packed import random_blocks
    from tests.loader.test_gguf_repack import K, MIXED_PARTS, merged_layer

    raws = [random_blocks(kind, rows, K, seed=i) for i, (kind, rows) in enumerate(MIXED_PARTS)]
    layers = {}
    for device in ("cpu", "cuda"):
        with torch.device(device):
            layer = merged_layer(MIXED_PARTS, torch.bfloat16)
        for shard, ((kind, rows), raw) in enumerate(zip(MIXED_PARTS, raws)):
            layer.load("weight", GGUFBlocks(kind, (rows, K), raw), shard)
        layer.finish_loading()
        layers[device] = layer
    assert layers["cuda"].qweight.dtype == torch.int32 and layers["cuda"].qweight.is_cuda
    x = torch.randn(num_tokens, K, dtype=torch.bfloat16)
    cpu, gpu = layers["cpu"](x).float(), layers["cuda"](x.cuda()).float().cpu()
    assert (gpu - cpu).abs().max() <= 2e-2 * cpu.abs().max()
    ids = torch.tensor([0, 5, 159, 160, 300, 455])
    cpu_rows = layers["cpu"].method.embed(layers["cpu"], ids).float()
    gpu_rows = layers["cuda"].method.embed(layers["cuda"], ids.cuda()).float().cpu()
    torch.testing.assert_close(gpu_rows, cpu_rows, rtol=1e-2, atol=1e-4)   # one bf16 rounding apart at most
    dense = layers["cuda"].method.dense_weight(layers["cuda"], slice(150, 170)).cpu()
    torch.testing.assert_close(dense, layers["cpu"].method.dense_weight(layers["cpu"], slice(150, 170)), rtol=1e-5, atol=1e-6)


def integer_gemv_model(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    """What `_int4_gemv_dot_kernel` computes, in float64: x rounded to int16 per chunk of 32 inputs (scale =
    the chunk's largest |x| / 32767), times each group's scale x code, plus the group's zero term
    (zero - 8 scale) times the chunk's exact sum of x."""
    from ondo.layers.quantization.int4_gpu import unpack_words

    k = layer.in_features
    codes = unpack_words(layer.qweight).double()                                      # [N, P*K_pad]
    n, k_pad = codes.shape[0], codes.shape[1] // layer.planes
    xf = torch.zeros(k_pad, dtype=torch.float32, device=x.device)
    xf[:k] = x[0].float()
    chunks = xf.view(-1, 32)
    amax = chunks.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, 32767.0 / amax, torch.zeros_like(amax))
    rounded = (torch.round(chunks.double() * inv.double()) * (amax / 32767.0).double()).view(-1)  # x as multiplied
    sz = layer.scales_and_zeros.double().transpose(0, 1)                              # [N, P*G, 2]
    scale = sz[..., 0].repeat_interleave(layer.group, 1)                             # [N, P*K_pad]
    zero_term = (sz[..., 1] - 8 * sz[..., 0]).repeat_interleave(layer.group, 1)
    x_rounded, x_exact = rounded.repeat(layer.planes), xf.double().repeat(layer.planes)
    return (codes * scale) @ x_rounded + zero_term @ x_exact


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,bits,k", [(32, 4, 4096), (64, 4, 1024), (128, 4, 1024), (32, 8, 1024),
                                          (32, 4, 576), (256, 4, 512)])
def test_integer_gemv_rounds_x_per_chunk_and_nothing_else(group, bits, k, dtype):
    """The one-row integer kernel equals its float64 model within the one rounding to x's dtype, and the
    exact product within that plus the int16 rounding of x, an outlier chunk included."""
    from ondo.layers.quantization import int4_gpu_kernels as kernels
    from tests.layers.test_int4_gpu_layout import decode_words

    n = 4096 + 37                                     # the last program's columns masked
    layer = packed_layer(random_affine(n, k, group, bits), n, k)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(1, k, generator=g) * torch.rand(1, k, generator=g) * 4)
    x[0, 40] = 300.0                                  # one chunk's scale set by an outlier
    x[0, 64:96] = 0.0                                 # an all-zero chunk (scale 0)
    x = x.to(dtype).cuda()
    assert kernels.integer_gemv_serves(x, group)
    got = layer(x)[0].double()
    model = integer_gemv_model(x, layer)
    ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    # 1e-4: where x * (32767 / amax) lies within the kernel's division error of a half, its int16 may be
    # the neighbour of the model's (one step of the chunk's scale, a few times in 4,096 inputs)
    assert ((got - model).abs() <= ulp * model.abs() + 1e-4 * model.abs().max()).all()
    exact = decode_words(layer).double() @ x[0].double()
    assert (got - exact).abs().max() <= (ulp + 1e-3) * exact.abs().max()      # the model is the product
