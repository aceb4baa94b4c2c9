"""GGUF weights kept packed: exact block decoding, the packed linear kernels, and whole models whose
greedy output equals the same file dequantized (the reference path, `quantization="none"`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from ondo import LLM, SamplingParams
from ondo.layers import cpu_kernels
from ondo.layers.linear import Linear, linear_method_scope
from ondo.layers.quantization import int4_planes
from ondo.layers.quantization.int4_planes import cpu_tile_rows, pack_tiles, unpack_tiles
from ondo.layers.quantization.gguf_blocks import PACKED_TYPES, GGUFBlocks, GGUFLinearMethod, decode_blocks
from tests.layers.int4_activations import activations_seen
from tests.tokenizer.model_files import gemma3_gguf_path, smollm2_gguf_path


def random_blocks(kind: T, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Blocks of `kind` for an [n, k] matrix: quantized by gguf-py where it can, else random bytes
    with sane float16 scales (gguf-py has no K-quant quantizer)."""
    rng = np.random.default_rng(seed)
    try:
        return quantize(rng.standard_normal((n, k)).astype(np.float32), kind)
    except NotImplementedError:
        elems, size = GGML_QUANT_SIZES[kind]
        raw = rng.integers(0, 256, (n, k // elems * size), dtype=np.uint8)
        blocks = raw.reshape(n, k // elems, size)
        fields = {T.Q4_K: [(0, 0.01), (2, 0.02)], T.Q5_K: [(0, 0.01), (2, 0.02)], T.Q6_K: [(208, 0.003)]}[kind]
        for offset, value in fields:
            blocks[..., offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
        return raw


def packed_linear(raw: np.ndarray, kind: T, n: int, k: int, dtype: torch.dtype) -> Linear:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with linear_method_scope(lambda layer: GGUFLinearMethod()):
            layer = Linear(k, n)
    finally:
        torch.set_default_dtype(previous)
    layer.load("weight", GGUFBlocks(kind, (n, k), raw))
    layer.finish_loading()
    return layer


@pytest.mark.parametrize("kind", PACKED_TYPES, ids=lambda t: t.name)
def test_blocks_decode_exactly_like_gguf_py(kind):
    raw = random_blocks(kind, 8, 512)
    reference = dequantize(raw, kind).reshape(8, 512)
    np.testing.assert_array_equal(decode_blocks(GGUFBlocks(kind, (8, 512), raw)).dequantize().numpy(), reference)


@pytest.mark.parametrize("kind", PACKED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("num_tokens", [1, 40])   # the int4 kernel and the dequantize + GEMM path
def test_packed_linear_matches_dequantized(kind, num_tokens):
    n, k = 96, 512                        # 96 rows: the last 64-row tile is padded
    raw = random_blocks(kind, n, k, seed=1)
    weight = torch.from_numpy(dequantize(raw, kind).reshape(n, k))
    x = torch.randn(num_tokens, k, generator=torch.Generator().manual_seed(0))
    exact = packed_linear(raw, kind, n, k, torch.float32)
    seen = activations_seen(x, exact).float()                # x as ondo's CPU kernel rounds it, if it does
    torch.testing.assert_close(exact(x), seen @ weight.t(), rtol=1e-4, atol=1e-3)   # summation order only
    half = packed_linear(raw, kind, n, k, torch.bfloat16)
    reference = x.bfloat16().float() @ weight.t()
    error = (half(x.bfloat16()).float() - reference).abs().max() / reference.abs().max()
    assert error < 1e-2, f"bfloat16 relative error {error:.2e}"
    ids = torch.tensor([0, 31, 32, 63, 64, 95])
    torch.testing.assert_close(exact.method.embed(exact, ids), weight[ids], rtol=0, atol=0)


@pytest.mark.skipif(cpu_kernels.library() is None, reason="float16 scales are for ondo's CPU kernel")
def test_float32_runs_keep_float16_scales_where_exact():
    """A GGUF's float16 scales stay float16 pairs (scale, zero - 8 scale) on the CPU where every value
    converts exactly (half the bytes of float32 pairs); K-quants' scales (d times a 6-bit scale) do not
    and stay float32. Either way the weights are the file's, bit for bit."""
    for kind, want in ((T.Q4_1, torch.float16), (T.Q8_0, torch.float16), (T.Q4_K, torch.float32)):
        raw = random_blocks(kind, 96, 512, seed=2)
        layer = packed_linear(raw, kind, 96, 512, torch.float32)
        assert layer.scales_and_zeros.dtype == want, kind.name
        weight = torch.from_numpy(dequantize(raw, kind).reshape(96, 512))
        assert torch.equal(layer.method.dense_weight(layer), weight), kind.name
    raw = random_blocks(T.Q4_0, 64, 64, seed=3)
    raw.view(np.float16)[:, 0] = 1e4                            # d: -8 d overflows float16's 65504
    layer = packed_linear(raw, T.Q4_0, 64, 64, torch.float32)
    assert layer.scales_and_zeros.dtype == torch.float32


def test_cpu_tile_layout_is_torchs():
    """torch's CPU int4 kernel reads a layout that depends on the CPU (64-row tiles with AVX512, 32 with
    AVX2): the packer must write the one its kernel reads here, and unpacking must invert it."""
    codes = torch.randint(0, 16, (192, 96), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    packed = pack_tiles(codes.to(torch.uint8))
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)), cpu_tile_rows()
    assert torch.equal(unpack_tiles(packed), codes.to(torch.uint8))


@pytest.mark.parametrize("tile", [16, 32, 64])
def test_dequantizing_and_embedding_read_every_tile(monkeypatch, tile):
    """The tile sizes other CPUs use: rows and embeddings read back from their layout, without torch's
    kernel (which reads only this CPU's)."""
    monkeypatch.setattr(int4_planes, "cpu_tile_rows", lambda: tile)
    n, k = 96, 256
    raw = random_blocks(T.Q4_0, n, k, seed=3)
    weight = torch.from_numpy(dequantize(raw, T.Q4_0).reshape(n, k))
    layer = packed_linear(raw, T.Q4_0, n, k, torch.float32)
    codes = torch.randint(0, 16, (128, 64), dtype=torch.uint8)
    assert torch.equal(unpack_tiles(pack_tiles(codes)), codes)
    torch.testing.assert_close(layer.method.dense_weight(layer), weight, rtol=0, atol=0)
    ids = torch.tensor([0, tile // 2 - 1, tile // 2, tile - 1, tile, 95])
    torch.testing.assert_close(layer.method.embed(layer, ids), layer.method.dense_weight(layer)[ids], rtol=0, atol=0)


@pytest.mark.parametrize("dtype,ratio", [("bfloat16", 1.1), ("float32", 1.1 if cpu_kernels.library() else 1.25)])
def test_packed_model_memory_is_the_file_size(dtype, ratio):
    """The codes take the file's bytes; each group of 32 keeps a scale and a zero: 4 bytes in bfloat16
    (Q4_1's own 4), 4 in float32 where ondo's kernel reads float16 pairs (exact for Q4_1 and Q8_0), else 8
    (exact: 24 bytes a group against Q4_1's 20)."""
    path = smollm2_gguf_path()
    llm = LLM(str(path), dtype=dtype, max_model_len=256)
    model = llm.engine.model
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert weight_bytes < ratio * path.stat().st_size, (weight_bytes, path.stat().st_size)


PROMPTS = ["The history of the Roman Empire", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at"]
NEW_TOKENS = 64


def greedy(llm: LLM, logprobs: int):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=logprobs)
    return [out.outputs[0] for out in llm.generate(PROMPTS, params)]


def assert_packed_equals_dequantized(path, dtype: str):
    """Greedy tokens of the packed model equal the dequantized model's, up to near-ties
    (`assert_same_greedy`). In bfloat16 the two runs are two roundings of one model: the reference rounds
    every dequantized weight to bfloat16 (up to 2^-9 of it), the packed one multiplies the exact weights
    with float32 sums, and each rounds its activations to bfloat16 after every op of 30 layers. Chosen
    tokens' log-probabilities then differ by up to a few bfloat16 steps of a logit near 20 (0.125 each):
    on a 2-core AVX2 CPU 0.32 with float activations and 0.22 (0.19 for Gemma 3) with rounded ones, under
    0.25 on the AVX512 CPUs before, with top-5 margins moving by 0.625; a wrong code, scale or zero moves
    them by whole nats."""
    packed = greedy(LLM(str(path), dtype=dtype, max_model_len=256), logprobs=5)
    reference = greedy(LLM(str(path), dtype=dtype, quantization="none", max_model_len=256), logprobs=5)
    if dtype == "float32":
        assert_same_greedy(packed, reference, f"{path.name} {dtype}", 1e-3)
    else:
        assert_same_greedy(packed, reference, f"{path.name} {dtype}", 0.5, noise_bound=1.0)


def assert_same_greedy(packed: list, reference: list, label: str, bound: float,
                       noise_bound: float | None = None) -> None:
    """Greedy tokens of two runs are equal. A divergence is allowed only at a proven near-tie: each run's
    choice is in the other's top 5, and the two candidates' log-probability difference moved between the
    runs by no more than 1.5 times the most any pair of top-5 candidates' difference moved where the runs
    agreed (the rounding noise of the two, measured on the same run; bfloat16 logits of ~20 are 0.125
    apart, so a bfloat16 tie spans several of their units), which stays within `noise_bound` when given.
    The chosen tokens' log-probabilities differ by less than `bound` where the runs agree."""
    largest = noise = 0.0
    divergences = []
    for ours, ref in zip(packed, reference):
        agreed = 0
        for position, (mine, theirs) in enumerate(zip(ours.token_ids, ref.token_ids)):
            lp_ours, lp_ref = ours.logprobs[position], ref.logprobs[position]
            if mine != theirs:
                divergences.append((lp_ours, lp_ref, mine, theirs))
                break
            largest = max(largest, abs(lp_ours[mine].logprob - lp_ref[mine].logprob))
            for other in set(lp_ours) & set(lp_ref) - {mine}:
                noise = max(noise, abs(_margin(lp_ours, mine, other) - _margin(lp_ref, mine, other)))
            agreed += 1
        print(f"{label}: {agreed}/{NEW_TOKENS} tokens agree on {ref.text[:30]!r}")
    print(f"{label}: largest log-probability difference {largest:.4f}, largest margin change {noise:.4f}")
    assert noise_bound is None or noise <= noise_bound, f"top-5 margins moved by {noise:.4f} where the runs agreed"
    for lp_ours, lp_ref, mine, theirs in divergences:
        assert mine in lp_ref and theirs in lp_ours, f"diverged to {mine}, outside the reference's top 5 (or back)"
        moved = _margin(lp_ref, theirs, mine) + _margin(lp_ours, mine, theirs)
        print(f"{label}: diverged where the margin moved {moved:.4f}")
        assert moved <= 1.5 * noise, f"diverged where the two candidates' margin moved {moved:.4f}"
    assert largest < bound


def _margin(logprobs: dict, first: int, second: int) -> float:
    return logprobs[first].logprob - logprobs[second].logprob


@pytest.mark.slow
def test_builtin_model_packed_equals_dequantized():
    assert_packed_equals_dequantized(smollm2_gguf_path(), "bfloat16")


@pytest.mark.slow
def test_gemma3_packed_equals_dequantized():
    assert_packed_equals_dequantized(gemma3_gguf_path(), "bfloat16")
