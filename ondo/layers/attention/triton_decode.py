"""Paged decode attention in Triton: one query token per sequence, K/V read straight from the paged cache.

Flash-decoding: each sequence's visible keys are cut into `num_splits` equal, tile-aligned slices, one
program per (sequence, KV head, slice); a second kernel merges the slices' partial softmax results. The
slice length is computed on the device from the sequence's real length, so the launch shape depends
only on host integers (batch size, heads, `num_splits`) and the whole call can be captured in a CUDA
graph once and replayed for any lengths up to the block table's capacity.

One program serves all query heads of a KV head (GQA): the group is padded to 16 rows so the scores
are a tensor-core product, and each K/V tile is loaded once for the whole group.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    from ondo.layers.triton_math import programmatic_launch_options, wait_for_previous_kernel
except ImportError:  # CPU-only installs never launch these kernels
    triton = None

LOG2E = 1.4426950408889634
_NEG_BIG = -1.0e30  # finite "minus infinity": a row that sees no key in a tile stays NaN-free


if triton is not None:

    @triton.jit
    def tanh_(x):
        # tanh through exp2 so the kernel runs on every backend (and in the interpreter); exact enough in float32
        e = tl.exp2(x * (2.0 * 1.4426950408889634))
        return 1.0 - 2.0 / (e + 1.0)

    # Batch-dependent integers are not specialized (see triton_prefill.py): no compile mid-serving.
    @triton.jit(do_not_specialize=["stride_bt_seq", "num_splits", "window"])
    def _paged_decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
        out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
        scale, softcap, window, num_splits,
        stride_q_tok, stride_q_head,
        stride_cache_block, stride_cache_tok, stride_cache_head,
        stride_bt_seq, stride_out_tok, stride_out_head,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, SPLIT: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_for_previous_kernel(PDL)
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        num_heads = tl.num_programs(1) * GROUP

        seq_len = tl.load(seq_lens_ptr + seq)
        lo = 0
        if HAS_WINDOW:  # the query at position seq_len - 1 sees keys p with (seq_len - 1) - p < window
            lo = tl.maximum(seq_len - window, 0)
        per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
        start = lo + split * per_split
        end = tl.minimum(start + per_split, seq_len)

        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        heads = kv_head * GROUP + offs_g                                       # [GROUP_PAD]
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + seq * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)          # [GROUP_PAD, BLOCK_D]

        m_i = tl.full([GROUP_PAD], -1.0e30, tl.float32)   # running max of log2-scaled scores
        l_i = tl.zeros([GROUP_PAD], tl.float32)           # running softmax denominator
        acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
        bt_row = block_tables_ptr + seq * stride_bt_seq
        head_off = kv_head * stride_cache_head
        for tile_start in range(start, end, BLOCK_N):
            pos = tile_start + offs_n                                          # [BLOCK_N] key positions
            n_mask = pos < end
            page = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
            tok_off = page * stride_cache_block + (pos % PAGE_SIZE) * stride_cache_tok + head_off
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + tok_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k))                                         # [GROUP_PAD, BLOCK_N] fp32
            if HAS_SOFTCAP:
                s = softcap * tanh_(s * (scale / softcap)) * 1.4426950408889634
            else:
                s = s * (scale * 1.4426950408889634)
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + tok_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        if SPLIT:  # partial results, merged by _merge_splits_kernel
            row = (seq * num_heads + heads) * num_splits + split                 # [GROUP_PAD]
            tl.store(part_max_ptr + row, m_i, mask=g_mask)
            tl.store(part_sum_ptr + row, l_i, mask=g_mask)
            tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=g_mask[:, None] & d_mask[None, :])
        else:
            # a zero-length sequence (a CUDA-graph padding row) has l_i == 0 and acc == 0: its output is 0
            out = acc / tl.maximum(l_i, 1.0e-30)[:, None]
            tl.store(out_ptr + seq * stride_out_tok + heads[:, None] * stride_out_head + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])

    @triton.jit(do_not_specialize=["num_splits"])
    def _merge_splits_kernel(
        part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, num_splits,
        stride_out_tok, stride_out_head,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_for_previous_kernel(PDL)
        seq = tl.program_id(0)
        head = tl.program_id(1)
        num_heads = tl.num_programs(1)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < num_splits
        d_mask = offs_d < HEAD_DIM
        row = (seq * num_heads + head) * num_splits + offs_s                    # [SPLITS_PAD]
        m = tl.load(part_max_ptr + row, mask=s_mask, other=-1.0e30)
        l = tl.load(part_sum_ptr + row, mask=s_mask, other=0.0)
        acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=s_mask[:, None] & d_mask[None, :], other=0.0)        # [SPLITS_PAD, BLOCK_D]
        weight = tl.exp2(m - tl.max(m, 0))                                     # empty slices weigh 0
        denom = tl.sum(l * weight, 0)
        out = tl.sum(acc * weight[:, None], 0) / tl.maximum(denom, 1.0e-30)
        tl.store(out_ptr + seq * stride_out_tok + head * stride_out_head + offs_d,
                 out.to(out_ptr.dtype.element_ty), mask=d_mask)


def decode_tile_config(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_N keys per tile, num_warps, num_stages) for the decode kernel."""
    if head_dim > 128:
        return 32, 4, 2
    return 64, 4, 2


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 *, scale: float, sliding_window: int | None, logit_softcap: float | None,
                 num_splits: int, out: torch.Tensor | None = None,
                 tile_config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """q [S, H, D] (one query per sequence, at position seq_lens[i] - 1) -> [S, H, D].

    kv_cache [2, num_blocks, block_size, KVH, D]; block_tables [S, max_blocks] int32; seq_lens [S] int32
    (0 marks a padding row: its output is zeros). No host synchronisation, no data-dependent shapes.
    """
    num_seqs, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty((num_seqs, num_heads, head_dim), dtype=q.dtype, device=q.device)   # [S, H, D]
    if num_seqs == 0:
        return out
    block_n, num_warps, num_stages = tile_config or decode_tile_config(head_dim)
    block_d = triton.next_power_of_2(head_dim)
    split = num_splits > 1
    if split:
        part_acc = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_max = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out   # unused when SPLIT is off
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens,
        out, part_acc, part_max, part_sum,
        scale, logit_softcap or 1.0, sliding_window or 0, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=block_n, PAGE_SIZE=page_size, SPLIT=split,
        HAS_SOFTCAP=logit_softcap is not None, HAS_WINDOW=sliding_window is not None,
        num_warps=num_warps, num_stages=num_stages, **programmatic_launch_options(q),
    )
    if split:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_acc, part_max, part_sum, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4, **programmatic_launch_options(q),
        )
    return out
