"""The Triton attention kernels against the portable reference (torch_backend in float32).

Random batches: mixed lengths, partially filled last blocks, block tables scattered over the pool, GQA
and MQA, sliding windows, soft-capping, cached prefixes under prompt chunks. Outputs are poisoned with
NaN before each launch, so an element no program wrote fails the check. Runs on a CUDA GPU; with
TRITON_INTERPRET=1 it also runs (slowly) on the CPU through Triton's interpreter, float16 only.
"""
from __future__ import annotations

import os

import pytest
import torch

from ondo.layers.attention import AttentionMetadata
from ondo.layers.attention.torch_backend import TorchAttentionBackend
from ondo.layers.attention.triton_backend import TritonAttentionBackend, check_inputs, choose_decode_splits

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNNABLE = HAS_TRITON and (torch.cuda.is_available() or INTERPRET)
needs_kernels = pytest.mark.skipif(not RUNNABLE, reason="needs CUDA and Triton (or TRITON_INTERPRET=1)")
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 2e-2}   # per-sequence relative error


def _dtype(name: str) -> torch.dtype:
    if INTERPRET and not torch.cuda.is_available():
        return torch.float16   # the interpreter has no bfloat16 constants
    return getattr(torch, name)


def make_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, max_seq_len=None):
    """Random q/k/v (strided views of one fused projection, as the models produce), a cache holding random
    prefixes in scattered blocks, and the metadata that places each query at the end of its sequence."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 7
    order = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq) + 2
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = torch.tensor(order[used:used + n])
        used += n
    slots = []
    for i, (q_len, s_len) in enumerate(zip(query_lens, seq_lens)):
        pos = torch.arange(s_len - q_len, s_len)
        slots.append(block_tables[i, pos // block_size].long() * block_size + pos % block_size)
    num_tokens = sum(query_lens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.to(DEVICE).split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    qsl = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(DEVICE), query_start_loc=qsl.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_tables=block_tables.to(DEVICE),
        max_query_len=max(query_lens), max_seq_len=max_seq_len or max(seq_lens),
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens), is_decode=all(n == 1 for n in query_lens))
    shape = lambda x, h: x.view(num_tokens, h, head_dim)  # noqa: E731
    return shape(q, num_heads), shape(k, num_kv_heads), shape(v, num_kv_heads), kv_cache, meta


def reference(q, k, v, kv_cache, meta, **kw):
    """(output, cache after the write) from the portable backend in float32."""
    ref_cache = kv_cache.float().clone()
    out = TorchAttentionBackend().forward(q.float(), k.float(), v.float(), ref_cache, meta, **kw)
    return out, ref_cache


def assert_matches(out, ref, query_lens, dtype):
    assert not torch.isnan(out).any(), "some outputs were never written (NaN poison left) or are NaN"
    start = 0
    for i, n in enumerate(query_lens):
        got, want = out[start:start + n].float(), ref[start:start + n]
        err = ((got - want).norm() / want.norm()).item()
        assert err < TOLERANCE[dtype], f"sequence {i} (query_len {n}): relative error {err:.2e}"
        start += n


DECODE_CASES = [  # (num_heads, num_kv_heads, head_dim, block_size, dtype, window, softcap, splits)
    (32, 8, 128, 16, "bfloat16", None, None, None),
    (32, 8, 128, 16, "float16", None, None, 1),
    (32, 8, 128, 16, "bfloat16", None, None, 64),
    (8, 8, 64, 32, "float16", None, None, None),
    (8, 4, 256, 16, "bfloat16", 100, 50.0, None),
    (16, 1, 128, 16, "float16", 333, None, 8),
    (12, 4, 96, 32, "bfloat16", None, 30.0, 4),
]


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("seed", [0, 1])
def test_paged_decode_matches_reference(case, seed):
    from ondo.layers.attention.triton_cache import write_kv_cache
    from ondo.layers.attention.triton_decode import paged_decode

    num_heads, num_kv_heads, head_dim, block_size, dtype_name, window, softcap, splits = case
    dtype = _dtype(dtype_name)
    gen = torch.Generator().manual_seed(100 + seed)
    longest = 300 if INTERPRET else 3000
    seq_lens = [1, block_size, block_size + 1] + torch.randint(2, longest, (6,), generator=gen).tolist()
    q, k, v, kv_cache, meta = make_batch([1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, head_dim,
                                         block_size, dtype, seed)
    kw = dict(scale=head_dim ** -0.5, sliding_window=window, logit_softcap=softcap)
    ref, ref_cache = reference(q, k, v, kv_cache, meta, **kw)
    backend = TritonAttentionBackend(decode_splits=splits)
    write_kv_cache(kv_cache, k, v, meta.slot_mapping)
    assert torch.equal(kv_cache.float(), ref_cache)
    poisoned = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    num_splits = splits or choose_decode_splits(len(seq_lens), num_kv_heads, meta.max_seq_len, 132)
    out = paged_decode(q, kv_cache, meta.block_tables, meta.seq_lens, num_splits=num_splits, out=poisoned, **kw)
    assert_matches(out, ref, meta.query_lens_cpu, dtype)
    # the backend entry point (write + attend) gives the same answer on a fresh cache
    _, _, _, fresh_cache, _ = make_batch(meta.query_lens_cpu, seq_lens, num_heads, num_kv_heads, head_dim,
                                         block_size, dtype, seed)
    assert_matches(backend.forward(q, k, v, fresh_cache, meta, **kw), ref, meta.query_lens_cpu, dtype)


PREFILL_CASES = [  # (query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, window, softcap)
    ([1, 17, 300, 64, 700], [0, 40, 513, 0, 7], 32, 8, 128, 16, "bfloat16", None, None),
    ([128, 5, 260], [0, 0, 0], 8, 8, 64, 32, "float16", None, None),
    ([90, 1, 33, 200], [300, 12, 0, 31], 8, 4, 256, 16, "bfloat16", 64, 50.0),
    ([300, 1, 1, 129], [1500, 700, 3, 0], 16, 4, 128, 16, "float16", 200, None),
    ([16, 48, 1], [0, 100, 64], 12, 4, 96, 32, "bfloat16", None, 30.0),
]


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"{c[6]}-d{c[4]}-g{c[2] // c[3]}-w{c[7]}-c{c[8]}")
def test_paged_prefill_matches_reference(case):
    from ondo.layers.attention.triton_cache import write_kv_cache
    from ondo.layers.attention.triton_prefill import paged_prefill

    query_lens, prefix_lens, num_heads, num_kv_heads, head_dim, block_size, dtype_name, window, softcap = case
    if INTERPRET:
        query_lens, prefix_lens = [min(n, 70) for n in query_lens], [min(n, 90) for n in prefix_lens]
    dtype = _dtype(dtype_name)
    seq_lens = [p + n for p, n in zip(prefix_lens, query_lens)]
    q, k, v, kv_cache, meta = make_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size,
                                         dtype, seed=len(query_lens))
    kw = dict(scale=head_dim ** -0.5, sliding_window=window, logit_softcap=softcap)
    ref, ref_cache = reference(q, k, v, kv_cache, meta, **kw)
    write_kv_cache(kv_cache, k, v, meta.slot_mapping)
    assert torch.equal(kv_cache.float(), ref_cache)
    poisoned = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    out = paged_prefill(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len,
                        out=poisoned, **kw)
    assert_matches(out, ref, query_lens, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")
def test_decode_replays_in_a_cuda_graph_for_new_lengths():
    """Captured once with an upper-bound max_seq_len, replayed on other lengths, tables and padding rows."""
    num_heads, num_kv_heads, head_dim, block_size, dtype = 32, 8, 128, 16, torch.bfloat16
    batch, bound = 8, 4096
    backend = TritonAttentionBackend()
    kw = dict(scale=head_dim ** -0.5, sliding_window=None, logit_softcap=None)
    first = make_batch([1] * batch, [bound] * batch, num_heads, num_kv_heads, head_dim, block_size, dtype, 0)
    static_q, static_k, static_v, kv_cache, static_meta = first
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        backend.forward(static_q, static_k, static_v, kv_cache, static_meta, **kw)   # compile outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = backend.forward(static_q, static_k, static_v, kv_cache, static_meta, **kw)

    seq_lens = [1, 17, 2049, 4096, 700, 33, 0, 0]   # the last two rows are padding
    real = [n for n in seq_lens if n]
    q, k, v, new_cache, meta = make_batch([1] * len(real), real, num_heads, num_kv_heads, head_dim,
                                          block_size, dtype, 1, max_seq_len=bound)
    ref, _ = reference(q, k, v, new_cache, meta, **kw)
    kv_cache[:, :new_cache.shape[1]].copy_(new_cache)
    static_q.zero_()
    static_q[:len(real)].copy_(q)
    static_k[:len(real)].copy_(k)
    static_v[:len(real)].copy_(v)
    static_meta.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
    static_meta.slot_mapping.fill_(-1)
    static_meta.slot_mapping[:len(real)].copy_(meta.slot_mapping)
    static_meta.block_tables.zero_()
    static_meta.block_tables[:len(real), :meta.block_tables.shape[1]].copy_(meta.block_tables)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(static_out[:len(real)], ref, [1] * len(real), dtype)
    assert torch.count_nonzero(static_out[len(real):]) == 0, "padding rows must come out as zeros"


def test_choose_decode_splits_fills_the_gpu_and_stays_a_power_of_two():
    assert choose_decode_splits(64, 8, 2048, 132) == 1            # 512 programs already fill 132 SMs
    assert choose_decode_splits(1, 8, 8192, 132) == 64            # one long sequence is cut into slices
    assert choose_decode_splits(1, 8, 300, 132) == 8              # 5 tiles of 64 keys: 5 slices, rounded up
    for seqs in (1, 3, 16, 200):
        splits = choose_decode_splits(seqs, 4, 32768, 132)
        assert 1 <= splits <= 64 and splits & (splits - 1) == 0


def test_check_inputs_names_the_bad_field():
    q = torch.zeros(2, 8, 64, dtype=torch.float32)
    kv = torch.zeros(2, 4, 16, 2, 64, dtype=torch.float32)
    k = torch.zeros(2, 2, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="q.dtype must be one of"):
        check_inputs(q, k, k, kv)
    with pytest.raises(ValueError, match="head_dim must be in"):
        check_inputs(torch.zeros(2, 8, 512, dtype=torch.float16), torch.zeros(2, 2, 512, dtype=torch.float16),
                     torch.zeros(2, 2, 512, dtype=torch.float16), torch.zeros(2, 4, 16, 2, 512, dtype=torch.float16))
    with pytest.raises(ValueError, match="num_heads must be a multiple"):
        check_inputs(torch.zeros(2, 7, 64, dtype=torch.float16), k.half(), k.half(), kv.half())
