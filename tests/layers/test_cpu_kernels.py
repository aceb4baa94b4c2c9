"""ondo's CPU kernels against the torch code they replace (the reference): the same roundings, so the
same bits where no float32 sum is reordered (residual add, rotation, KV write), within one unit of the
dtype's last place where one is (the norm's sum of squares); decode attention against float64."""
from __future__ import annotations

import pytest
import torch

from ondo.layers import cpu_kernels
from ondo.layers.activation import GatedActivation
from ondo.layers.attention import AttentionMetadata
from ondo.layers.attention.torch_backend import TorchAttentionBackend, gather_kv
from ondo.layers.norm import RMSNorm
from ondo.layers.quantization import int4_planes
from ondo.layers.rotary import apply_rotary_, rotation_tables
from tests.layers.int4_activations import activations_seen

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler to build the CPU kernels")
DTYPES = [torch.bfloat16, torch.float32]


def one_unit(dtype: torch.dtype) -> dict:
    """A result may differ by one unit in the last place: its float32 sum was taken in another order."""
    return dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("hidden", [64, 576, 1000])
def test_rms_norm_with_residual_matches_the_torch_path(dtype, offset, hidden):
    torch.manual_seed(hidden)
    norm = RMSNorm(hidden, eps=1e-6, offset=offset).to(dtype)
    norm.weight.data = (torch.randn(hidden) * 0.3 + (0 if offset else 1)).to(dtype)
    x = torch.randn(3, 7, hidden).to(dtype) * 4                 # 3-D: the per-head norms of Qwen3 / Gemma 3
    residual = torch.randn(3, 7, hidden).to(dtype)
    with cpu_kernels.disabled():
        want, want_sum = norm(x, residual)
        want_alone = norm(x)
    got, got_sum = norm(x, residual)
    assert torch.equal(got_sum, want_sum)                       # the residual add rounds once, as x + residual
    torch.testing.assert_close(got, want, **one_unit(dtype))
    torch.testing.assert_close(norm(x), want_alone, **one_unit(dtype))
    if dtype == torch.bfloat16:   # where the float32 difference is rounded away: almost always the same bits
        assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["silu", "gelu_pytorch_tanh"])
def test_gated_activation_matches_the_torch_path(dtype, name):
    torch.manual_seed(0)
    act = GatedActivation(name)
    gate_up = (torch.randn(5, 2 * 300) * 3).to(dtype)
    with cpu_kernels.disabled():
        want = act(gate_up)
    got = act(gate_up)
    torch.testing.assert_close(got, want, **one_unit(dtype))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(act(gate_up), got)           # rows shared by threads: each row's numbers its own
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot_dim", [32, 16])                   # 16: partial rotary, half of each head turns
def test_rotation_in_place_gives_the_same_bits_on_a_strided_view(dtype, rot_dim):
    torch.manual_seed(1)
    heads, head_dim, tokens = 6, 32, 5
    qkv = torch.randn(tokens, (heads + 2) * head_dim).to(dtype)
    positions = torch.arange(40, 40 + tokens).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    emb = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)
    tables = rotation_tables(emb.cos().to(dtype), emb.sin().to(dtype))
    want, got = qkv.clone(), qkv.clone()
    with cpu_kernels.disabled():
        apply_rotary_(want[:, :heads * head_dim], *tables, head_dim)
    apply_rotary_(got[:, :heads * head_dim], *tables, head_dim)   # rows with a stride: a view of q | k | v
    assert torch.equal(got, want)


def _metadata(seq_lens: list[int], tables: list[list[int]], block: int) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    slots = torch.tensor([t[(n - 1) // block] * block + (n - 1) % block for t, n in zip(tables, seq_lens)])
    return AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                             block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                             max_query_len=1, max_seq_len=max(seq_lens), query_lens_cpu=[1] * len(seq_lens),
                             seq_lens_cpu=list(seq_lens), is_decode=True)


def _exact_attention(q, kv_cache, meta, scale, window, softcap):
    """Each sequence and head alone in float64: [S, H, D]."""
    heads, kv_heads = q.shape[1], kv_cache.shape[3]
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, n in enumerate(meta.seq_lens_cpu):
        keys, values = (t[0].double() for t in gather_kv(kv_cache, meta.block_tables[s:s + 1], n))   # [n, KVH, D]
        first = max(0, n - window) if window else 0
        for h in range(heads):
            kv_head = h // (heads // kv_heads)
            scores = keys[first:, kv_head] @ q[s, h].double() * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            out[s, h] = scores.softmax(0) @ values[first:, kv_head]
    return out


@pytest.mark.parametrize("cache", ["activations", "float16"])   # kv_cache_dtype: auto, or float16 on the CPU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 64), (4, 4, 80), (8, 1, 128), (3, 1, 16)])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 30.0)])
def test_decode_attention_reads_the_paged_cache_in_place(dtype, heads, kv_heads, head_dim, window, softcap, cache):
    """Several sequences on blocks out of order, through the backend (which writes the new K/V first,
    rounded to a float16 cache as torch rounds them): float64 attention of the same inputs (the cache as
    it holds them) within the output's rounding (bfloat16) or a few units of float32 arithmetic, and no
    further from it than torch's path."""
    torch.manual_seed(head_dim + heads)
    cache_dtype = dtype if cache == "activations" else getattr(torch, cache)
    block = 4
    # The last two: one long sequence (its keys split in parts, merged) and two of them beside a short one.
    long = list(range(79, 8, -1))                                                  # 71 blocks, out of order
    cases = [([7], [[3, 5]]), ([9, 3, 13], [[1, 2, 6], [4], [11, 0, 7, 9]]), ([1], [[8]]),
             ([281], [long]), ([150, 2, 281], [long[1:39], [0], long])]
    for seq_lens, tables in cases:
        kv_cache = torch.randn(2, 80, block, kv_heads, head_dim).to(cache_dtype)
        meta = _metadata(seq_lens, tables, block)
        q, k, v = (torch.randn(len(seq_lens), n, head_dim).to(dtype) for n in (heads, kv_heads, kv_heads))
        scale = head_dim ** -0.5
        args = dict(scale=scale, sliding_window=window, logit_softcap=softcap)
        with cpu_kernels.disabled():
            reference_cache = kv_cache.clone()
            torch_out = TorchAttentionBackend().forward(q, k, v, reference_cache, meta, **args)
        out = TorchAttentionBackend().forward(q, k, v, kv_cache, meta, **args)
        assert torch.equal(kv_cache, reference_cache)           # the new K/V went to the same slots
        exact = _exact_attention(q, kv_cache, meta, scale, window, softcap)
        units = 1 if dtype == torch.bfloat16 else 16
        assert (out.double() - exact).abs().max().item() <= units * torch.finfo(dtype).eps * exact.abs().max().item()
        assert (out.double() - exact).abs().max() <= (torch_out.double() - exact).abs().max() + 1e-6


def test_rounded_activations_keep_16_bits_of_each_group():
    """The rounding itself: an outlier of 1000 next to inputs near 1 leaves those within 1000 / 65534."""
    from gguf import GGMLQuantizationType
    from tests.layers.test_gguf_packed import packed_linear, random_blocks

    if not cpu_kernels.int4_rounds_activations():
        pytest.skip("this CPU's int4 product multiplies activations as they are")
    kind = GGMLQuantizationType.Q4_1
    layer = packed_linear(random_blocks(kind, 64, 64, seed=1), kind, 64, 64, torch.float32)
    x = torch.rand(1, 64) + 0.5
    x[0, 3] = 1000.0
    seen = activations_seen(x, layer)
    assert (seen - x.double())[0, :32].abs().max() <= 1000 / 65534
    assert (seen - x.double())[0, 32:].abs().max() <= 1.5 / 65534            # the other group: its own scale
    weight = layer.method.dense_weight(layer).double()
    scale = (x.double().abs() @ weight.abs().t()).max().item()
    assert (layer(x).double() - seen @ weight.t()).abs().max().item() < 1e-6 * scale


@pytest.mark.parametrize("tile", [32, 64])                      # the AVX2 and AVX512 layouts, on any CPU
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q6_K", "Q5_K"])   # 1 plane; 2 planes; groups of 16; 2 planes of K-quants
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_product_reads_the_tile_layout(monkeypatch, tile, kind, dtype):
    """ondo's int4 product (decode-sized batches) against float64 on the layer's own dequantized weights
    and the activations as the kernel sees them (`activations_seen`): float32 within a few units of float32
    rounding, bfloat16 rounded once. 96 rows: a padded tile."""
    from gguf import GGMLQuantizationType
    from tests.layers.test_gguf_packed import packed_linear, random_blocks

    monkeypatch.setattr(int4_planes, "cpu_tile_rows", lambda: tile)
    n, k, kind = 96, 512, GGMLQuantizationType[kind]
    layer = packed_linear(random_blocks(kind, n, k, seed=4), kind, n, k, dtype)
    weight = layer.method.dense_weight(layer).double()                           # [n, k]
    bias = torch.randn(n).to(dtype)
    for rows in (1, 2, 3, 5, 7, 16):   # every count of rows a pass can take
        wide = torch.randn(rows, k + 32, generator=torch.Generator().manual_seed(rows)).to(dtype)
        x = wide[:, 16:16 + k]                                   # rows k + 32 apart, each dense
        got = layer(x)
        exact = activations_seen(x, layer) @ weight.t()
        if dtype == torch.float32:
            scale = (x.double().abs() @ weight.abs().t()).max().item()
            assert (got.double() - exact).abs().max().item() < 1e-6 * scale
        else:   # a float32 sum rounded once to bfloat16: within one unit of the exact value's last place
            assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-3).all()
        with_bias = layer.method.apply(layer, x, bias)
        assert torch.equal(with_bias, got + bias)
    tokens = torch.tensor([95, 0, 31, 32, 63, 64, 17])   # an embedding lookup: the C rows are the torch ones
    looked_up = layer.method.embed(layer, tokens)
    with cpu_kernels.disabled():
        assert torch.equal(looked_up, layer.method.embed(layer, tokens))
    assert torch.equal(looked_up, weight[tokens].to(dtype))        # planes summed in float32, rounded once
    with pytest.raises(IndexError, match=r"token ids must be in \[0, 96\), got 96"):
        layer.method.embed(layer, torch.tensor([96]))


def test_two_planes_are_one_codes_digits_only_where_their_scales_say_so():
    """`mark_digit_planes`: a Q8_0 layer's planes are its codes' digits (high plane: 16 times the scale, zero
    0); once its high plane's zeros are not 0 they are two products again, and both give the product of the
    layer's own weights."""
    from gguf import GGMLQuantizationType
    from tests.layers.test_gguf_packed import packed_linear, random_blocks

    n, k = 96, 512
    layer = packed_linear(random_blocks(GGMLQuantizationType.Q8_0, n, k, seed=8), GGMLQuantizationType.Q8_0, n, k,
                          torch.float32)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(9))
    for digits in (True, False):
        assert layer.digits == digits
        weight = layer.method.dense_weight(layer).double()
        scale = (x.double().abs() @ weight.abs().t()).max().item()
        assert (layer(x).double() - activations_seen(x, layer) @ weight.t()).abs().max().item() < 1e-6 * scale
        sz = layer.scales_and_zeros
        per_group = sz.transpose(0, 1) if sz.dim() == 4 else sz       # groups first (block_cpu_scales)
        groups = per_group.shape[0] // 2
        per_group[groups:, ..., 1] += 0.5 * per_group[groups:, ..., 0]
        int4_planes.mark_digit_planes(layer)
        layer.__dict__.pop("cpu_int4_weight", None)              # the kernel's view of the layer, rebuilt


def test_codes_layouts_hold_the_tiles_bytes_and_convert_back():
    """`to_code_bytes`: byte [tile, k / 2, d, k % 2] of 32-row tiles is row d's code at k, low digit | high
    digit << 4, from the digit planes' tile layout; `to_row_pairs`: byte [tile, k / 2, d, k % 2] is torch's
    byte [tile, k, d] (rows d and d + 16). Each converts back, and in place a few tiles at a time."""
    layouts = int4_planes.CodesLayout
    codes = torch.randint(0, 16, (64, 2 * 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    planes = int4_planes.pack_tiles(codes, 32)                                    # [64, 96]: plane 0, then 1
    code_bytes = int4_planes.to_code_bytes(planes)
    whole = codes[:, :96] | (codes[:, 96:] << 4)                                  # [64, K] each row's codes
    assert torch.equal(code_bytes.view(2, 48, 32, 2), whole.view(2, 32, 48, 2).transpose(1, 2))
    assert torch.equal(int4_planes.from_code_bytes(code_bytes), planes)
    pairs = int4_planes.to_row_pairs(planes).view(2, 96, 16, 2)                  # [tile, k / 2, d, k % 2]
    for t, k, d in [(0, 0, 0), (1, 191, 15), (0, 77, 9), (1, 120, 3)]:
        assert int(pairs[t, k // 2, d, k % 2]) == int(codes[32 * t + d, k]) | int(codes[32 * t + d + 16, k]) << 4
    assert torch.equal(int4_planes.from_row_pairs(pairs.view(64, 96)), planes)
    recoded = planes.clone()
    int4_planes.recode_tiles(recoded, layouts.TILES, layouts.CODE_BYTES)
    assert torch.equal(recoded, code_bytes)
    int4_planes.recode_tiles(recoded, layouts.CODE_BYTES, layouts.ROW_PAIRS)
    assert torch.equal(recoded, pairs.view(64, 96))


@pytest.mark.parametrize("kind", ["Q8_0", "Q6_K", "Q4_1"])   # digits; digits of groups of 16; one plane
@pytest.mark.parametrize("dtype", DTYPES)
def test_code_bytes_and_blocked_scales_give_the_planes_numbers(kind, dtype):
    """A loaded layer as the kernel reads it on this CPU (scales in blocks of 32 rows; on AVX2 8-bit digits
    as code bytes, other tiles as row pairs) gives bit for bit the numbers of the same layer kept in torch's
    tiles and group-major scales: products of 1 to 33 rows, embedding rows, dequantized rows, torch's kernel."""
    from gguf import GGMLQuantizationType
    from tests.layers.test_gguf_packed import packed_linear, random_blocks

    n, k, kind = 160, 512, GGMLQuantizationType[kind]
    layer = packed_linear(random_blocks(kind, n, k, seed=11), kind, n, k, dtype)
    assert layer.scales_and_zeros.dim() == 4                                     # blocks of rows
    layouts, layout = int4_planes.CodesLayout, int4_planes.codes_layout(layer)
    if int4_planes.cpu_tile_rows() == 32 and cpu_kernels.int4_reads_code_bytes():
        assert layout == (layouts.ROW_PAIRS if kind == GGMLQuantizationType.Q4_1 else layouts.CODE_BYTES)
    else:
        assert layout == layouts.TILES
    xs = [torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype) for rows in (1, 2, 3, 33)]
    tokens = torch.tensor([0, 31, 32, 95, 159])

    def numbers():
        with cpu_kernels.disabled():
            torch_kernel = layer(xs[1])
        return ([layer(x) for x in xs], layer.method.embed(layer, tokens), layer.method.dense_weight(layer, slice(64, 150)),
                torch_kernel)

    stored = numbers()
    layer.register_buffer("scales_and_zeros", int4_planes.group_major_scales(layer).contiguous(), persistent=False)
    int4_planes.recode_tiles(layer.qweight, layout, layouts.TILES)
    layer.codes_layout = layouts.TILES
    layer.__dict__.pop("cpu_int4_weight", None)                                 # the kernel's view, rebuilt
    for got, want in zip(stored, numbers(), strict=True):
        for a, b in zip(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want]):
            assert torch.equal(a, b)


def test_float16_cache_rounds_as_torch_does():
    """The KV write's float32 -> float16 rounding, bit for bit torch's: ties to even, the subnormals,
    the largest finite value and the first that overflows, infinities, NaN, signed zero."""
    tiny = 2.0 ** -24
    special = [0.0, -0.0, tiny, tiny / 2, tiny * 1.5, tiny * 2.5, 3 * tiny / 4, 2.0 ** -14, 2.0 ** -14 * (1 - 2 ** -12),
               65504.0, 65519.0, 65520.0, -65520.0, 1e10, float("inf"), float("-inf"), float("nan"),
               1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -11 + 2 ** -20, 0.1, -3.14159]
    k = torch.tensor(special + torch.randn(64 - len(special)).mul(1000).tolist()).view(1, 1, 64)
    v = torch.randn(1, 1, 64) * 1e-5                                          # partly subnormal in float16
    kv_cache = torch.zeros(2, 1, 4, 1, 64, dtype=torch.float16)
    cpu_kernels.write_kv(kv_cache, k, v, torch.tensor([2]))
    assert_same_halves(kv_cache[0, 0, 2], k[0].half())
    assert_same_halves(kv_cache[1, 0, 2], v[0].half())
    bf16_cache = torch.zeros(2, 1, 4, 1, 64, dtype=torch.float16)              # bfloat16 rows into float16
    cpu_kernels.write_kv(bf16_cache, k.bfloat16(), v.bfloat16(), torch.tensor([1]))
    assert_same_halves(bf16_cache[0, 0, 1], k[0].bfloat16().half())


def assert_same_halves(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit, but any NaN for a NaN (torch keeps a bfloat16 NaN's payload, the kernel a quiet NaN)."""
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))


@pytest.mark.parametrize("target", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")],
                         ids=["avx2", "scalar"])
def test_float16_cache_of_every_instruction_set(monkeypatch, tmp_path, target):
    """The float16 conversions of CPUs without AVX512, and without F16C (by hand, in common.h)."""
    monkeypatch.setenv("ONDO_CACHE_DIR", str(tmp_path))
    lib = cpu_kernels._load(target)
    assert lib is not None
    monkeypatch.setattr(cpu_kernels, "_lib", lib)
    test_float16_cache_rounds_as_torch_does()
    for dtype in DTYPES:
        test_decode_attention_reads_the_paged_cache_in_place(dtype, 6, 2, 64, None, None, "float16")


@pytest.mark.parametrize("target", [("-mno-avx512vnni",), ("-mno-avx512vbmi",), ("-mno-avx512f",),
                                    ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
                         ids=["avx512-without-vnni", "avx512-float", "avx2", "scalar"])
def test_int4_product_of_every_instruction_set(monkeypatch, tmp_path, target):
    """The code paths of other CPUs, built here as they build them: AVX512 without VNNI (rounded
    activations through vpmaddwd), without byte permutes (float activations), AVX2, portable C."""
    monkeypatch.setenv("ONDO_CACHE_DIR", str(tmp_path))
    lib = cpu_kernels._load(target)
    assert lib is not None
    monkeypatch.setattr(cpu_kernels, "_lib", lib)
    for tile in (32, 64):
        for kind in ("Q4_1", "Q6_K"):
            test_int4_product_reads_the_tile_layout(monkeypatch, tile, kind, torch.float32)


def test_int4_product_matches_torchs_kernel():
    """On this CPU's own layout, torch's kernel (the path without ondo's) gives the same product, of the
    activations as ondo's kernel sees them."""
    from gguf import GGMLQuantizationType
    from tests.layers.test_gguf_packed import packed_linear, random_blocks

    n, k = 3072, 576                                           # SmolLM2's gate/up shape
    layer = packed_linear(random_blocks(GGMLQuantizationType.Q4_1, n, k, seed=5), GGMLQuantizationType.Q4_1,
                          n, k, torch.float32)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(6))
    seen = activations_seen(x, layer).float()
    with cpu_kernels.disabled():
        want = layer(seen)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)


def test_a_missing_compiler_leaves_the_torch_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("ONDO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    x = torch.randn(2, 64)
    assert not cpu_kernels.usable(x)
    assert "CPU kernels failed" in caplog.text
    norm = RMSNorm(64)
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_the_built_library_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("ONDO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    assert cpu_kernels.library() is not None
    built = list((tmp_path / "cpu_kernels").glob("kernels-*.so"))
    assert len(built) == 1 and not list((tmp_path / "cpu_kernels").glob("*.so.tmp*"))
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    mtime = built[0].stat().st_mtime_ns
    assert cpu_kernels.library() is not None and built[0].stat().st_mtime_ns == mtime   # read back, not rebuilt
