"""The portable backend's decode path: the per-step shared inputs (block ids, mask) give the same
numbers as attending each sequence on its own with a full mask."""
from __future__ import annotations

import pytest
import torch

from ondo.layers import cpu_kernels
from ondo.layers.attention import AttentionMetadata
from ondo.layers.attention.torch_backend import TorchAttentionBackend, attend, gather_kv, visibility_mask, write_kv

BLOCK, KVH, HEADS, DIM = 4, 2, 6, 16


@pytest.fixture(autouse=True)
def torch_path():
    """These tests pin down the torch path itself, the reference that ondo's CPU kernels are tested
    against (tests/layers/test_cpu_kernels.py)."""
    with cpu_kernels.disabled():
        yield


def _decode_meta(seq_lens: list[int], tables: list[list[int]]) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    slots = torch.tensor([t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, seq_lens)])
    return AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables,
                             max_query_len=1, max_seq_len=max(seq_lens), query_lens_cpu=[1] * len(seq_lens),
                             seq_lens_cpu=list(seq_lens), is_decode=True)


def _reference(q, kv_cache, meta, window):
    """Each sequence alone, with the full visibility mask: [S, H, D]."""
    outs = []
    for i, n in enumerate(meta.seq_lens_cpu):
        keys, values = gather_kv(kv_cache, meta.block_tables[i:i + 1], n)             # [1, n, KVH, D]
        mask = visibility_mask(torch.tensor([[n - 1]]), torch.arange(n), torch.tensor([n]), window)
        outs.append(attend(q[i:i + 1, :, None], keys.transpose(1, 2), values.transpose(1, 2), mask,
                           DIM ** -0.5, None)[0, :, 0])
    return torch.stack(outs)


# Bit for bit, except with torch's bfloat16 kernels for AVX2, which round about one output in a hundred
# a unit or two differently between the batched and the one-sequence shapes.
SAME_AS_ALONE = (dict(rtol=2 ** -6, atol=2 ** -9) if torch.backends.cpu.get_cpu_capability() == "AVX2"
                 else dict(rtol=0, atol=0))


def test_decode_matches_each_sequence_alone_across_layers_and_steps():
    torch.manual_seed(0)
    backend = TorchAttentionBackend()
    caches = [torch.randn(2, 16, BLOCK, KVH, DIM, dtype=torch.bfloat16) for _ in range(2)]   # two layers
    cases = [([7], [[3, 5]]), ([9, 3], [[1, 2, 6], [4]]), ([3, 9], [[4], [1, 2, 6]])]
    for window in (None, 4):
        for seq_lens, tables in cases:
            meta = _decode_meta(seq_lens, tables)        # one metadata object per step, shared by the layers
            for kv_cache in caches:
                q = torch.randn(len(seq_lens), HEADS, DIM, dtype=torch.bfloat16)
                k = torch.randn(len(seq_lens), KVH, DIM, dtype=torch.bfloat16)
                v = torch.randn(len(seq_lens), KVH, DIM, dtype=torch.bfloat16)
                out = backend.forward(q, k, v, kv_cache, meta, scale=DIM ** -0.5, sliding_window=window,
                                      logit_softcap=None)
                torch.testing.assert_close(out, _reference(q, kv_cache, meta, window), **SAME_AS_ALONE)


def test_single_sequence_decode_with_soft_capping_matches_the_masked_path():
    torch.manual_seed(1)
    backend = TorchAttentionBackend()
    kv_cache = torch.randn(2, 16, BLOCK, KVH, DIM, dtype=torch.bfloat16)
    meta = _decode_meta([7], [[3, 5]])
    q = torch.randn(1, HEADS, DIM, dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, KVH, DIM, dtype=torch.bfloat16)
    out = backend.forward(q, k, v, kv_cache, meta, scale=DIM ** -0.5, sliding_window=None, logit_softcap=5.0)
    keys, values = gather_kv(kv_cache, meta.block_tables, 7)                          # [1, 7, KVH, D]
    mask = visibility_mask(torch.tensor([[6]]), torch.arange(7), torch.tensor([7]), None)
    want = attend(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), mask, DIM ** -0.5, 5.0)[:, :, 0]
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_kv_write_from_the_merged_qkv_row_equals_separate_tensors():
    """k and v as views of one [T, q | k | v] output are written with one copy; the cache ends the same."""
    torch.manual_seed(2)
    qkv = torch.randn(3, (HEADS + 2 * KVH) * DIM, dtype=torch.bfloat16)
    q_size, kv_size = HEADS * DIM, KVH * DIM
    k = qkv[:, q_size:q_size + kv_size].view(3, KVH, DIM)
    v = qkv[:, q_size + kv_size:].view(3, KVH, DIM)
    slots = torch.tensor([5, 0, 13])
    merged, separate = torch.zeros(2, 4, BLOCK, KVH, DIM, dtype=torch.bfloat16), torch.zeros(2, 4, BLOCK, KVH, DIM,
                                                                                              dtype=torch.bfloat16)
    write_kv(merged, k, v, slots)
    write_kv(separate, k.clone(), v.clone(), slots)
    torch.testing.assert_close(merged, separate, rtol=0, atol=0)
    torch.testing.assert_close(merged[0].view(-1, KVH, DIM)[slots], k, rtol=0, atol=0)
    torch.testing.assert_close(merged[1].view(-1, KVH, DIM)[slots], v, rtol=0, atol=0)


def test_single_sequence_on_consecutive_blocks_is_read_in_place_with_the_same_numbers():
    torch.manual_seed(2)
    kv_cache = torch.randn(2, 16, BLOCK, KVH, DIM, dtype=torch.bfloat16)
    for seq_len, table, first in ((9, [3, 4, 5], 3), (7, [3, 5], None), (4, [8], 8)):
        backend = TorchAttentionBackend()
        meta = _decode_meta([seq_len], [table])
        q, k, v = (torch.randn(1, n, DIM, dtype=torch.bfloat16) for n in (HEADS, KVH, KVH))
        out = backend.forward(q, k, v, kv_cache, meta, scale=DIM ** -0.5, sliding_window=None, logit_softcap=None)
        assert backend._step_shared["first_block"] == first   # None: gathered, the blocks do not follow each other
        torch.testing.assert_close(out, _reference(q, kv_cache, meta, None), rtol=0, atol=0)
