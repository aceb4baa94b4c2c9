"""Paged prefill attention in Triton: variable-length query chunks over the paged cache.

Each sequence's queries are the last `query_len` positions of its `seq_len` cached tokens, so a prompt
chunk that follows a cached prefix (chunked prefill, prefix-cache hit) reads that prefix straight from
the block table: nothing is gathered into contiguous K/V first. One program per (query tile, query
head, sequence), flash-attention style (online softmax, float32 accumulator). Key tiles that every
query of the tile may see run without a mask; only the tiles on the diagonal (and, with a sliding
window, every tile) pay for masking.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs never launch these kernels
    triton = None

if triton is not None:
    from ondo.layers.attention.triton_decode import tanh_

    @triton.jit
    def _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row, head_off, tile_start, q_pos, seq_end,
                     scale, softcap, window, offs_n, offs_d, d_mask,
                     stride_cache_block, stride_cache_tok,
                     PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
        pos = tile_start + offs_n                                               # [BLOCK_N] key positions
        if MASKED:
            n_mask = pos < seq_end
            page = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
        else:
            page = tl.load(bt_row + pos // PAGE_SIZE).to(tl.int64)
            kv_mask = d_mask[None, :]
        tok_off = page * stride_cache_block + (pos % PAGE_SIZE) * stride_cache_tok + head_off
        k = tl.load(k_cache_ptr + tok_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k))                                              # [BLOCK_M, BLOCK_N] fp32
        if HAS_SOFTCAP:
            s = softcap * tanh_(s * (scale / softcap)) * 1.4426950408889634
        else:
            s = s * (scale * 1.4426950408889634)
        if MASKED:
            visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
            if HAS_WINDOW:
                visible = visible & (q_pos[:, None] - pos[None, :] < window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + tok_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, l_i, m_new

    # The block-table width changes with the batch's longest sequence: specialized on (== 1, % 16 == 0,
    # other), a first cache hit or an odd prompt length compiled a new variant (~1 s) mid-serving.
    @triton.jit(do_not_specialize=["stride_bt_seq", "window"])
    def _paged_prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
        scale, softcap, window,
        stride_q_tok, stride_q_head, stride_out_tok, stride_out_head,
        stride_cache_block, stride_cache_tok, stride_cache_head, stride_bt_seq,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ):
        # the costliest (last) query tiles start first, so the causal imbalance drains early
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        head = tl.program_id(1)
        seq = tl.program_id(2)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        if tile * BLOCK_M >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + seq)
        first_q = seq_len - q_len + tile * BLOCK_M                             # position of the tile's first query

        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        q_pos = seq_len - q_len + offs_m                                        # [BLOCK_M]
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)          # [BLOCK_M, BLOCK_D]

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bt_row = block_tables_ptr + seq * stride_bt_seq
        head_off = (head // GROUP) * stride_cache_head
        seq_end = tl.minimum(first_q + BLOCK_M, seq_len)                        # one past the tile's last query
        if HAS_WINDOW:
            lo = (tl.maximum(first_q - window + 1, 0) // BLOCK_N) * BLOCK_N
            full_end = lo
        else:
            lo = 0
            full_end = (first_q // BLOCK_N) * BLOCK_N                          # keys every row of the tile sees
        for tile_start in range(lo, full_end, BLOCK_N):
            acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row, head_off, tile_start,
                                         q_pos, seq_end, scale, softcap, window, offs_n, offs_d, d_mask,
                                         stride_cache_block, stride_cache_tok,
                                         PAGE_SIZE, False, HAS_SOFTCAP, HAS_WINDOW)
        for tile_start in range(full_end, seq_end, BLOCK_N):
            acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row, head_off, tile_start,
                                         q_pos, seq_end, scale, softcap, window, offs_n, offs_d, d_mask,
                                         stride_cache_block, stride_cache_tok,
                                         PAGE_SIZE, True, HAS_SOFTCAP, HAS_WINDOW)
        out = acc / tl.maximum(l_i, 1.0e-30)[:, None]
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_out_tok + head * stride_out_head + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_tile_config(head_dim: int, max_query_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) for the prefill kernel."""
    if head_dim > 128:
        return 64, 32, 4, 2
    # One warpgroup per 64-query tile beat 128-query tiles with 8 warps on an H100 (docs/gpu_notes.md)
    return (64 if max_query_len > 16 else 16), 64, 4, 2


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  query_start_loc: torch.Tensor, max_query_len: int, *, scale: float,
                  sliding_window: int | None, logit_softcap: float | None,
                  tile_config: tuple[int, int, int, int] | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] packed by query_start_loc [S + 1] -> [T, H, D]; seq i's queries sit at the end of its seq_lens[i]."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)   # [T, H, D]
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m, block_n, num_warps, num_stages = tile_config or prefill_tile_config(head_dim, max_query_len)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        scale, logit_softcap or 1.0, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=page_size,
        HAS_SOFTCAP=logit_softcap is not None, HAS_WINDOW=sliding_window is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
