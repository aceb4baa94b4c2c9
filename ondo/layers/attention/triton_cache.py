"""Writing a step's new K/V into the paged cache (reshape-and-cache) in one Triton launch.

One program per token copies its [KVH, D] keys and values to slot `slot_mapping[t]`. A negative slot
means "no token here" (CUDA-graph padding) and is skipped, so padded batches need no dummy block.
k and v may be strided views (e.g. slices of a fused QKV projection); only the last dim must be dense.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs never launch these kernels
    triton = None

if triton is not None:

    @triton.jit
    def _write_kv_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
        stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
        stride_cache_block, stride_cache_tok, stride_cache_head,
        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
    ):
        tok = tl.program_id(0)
        slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
        if slot < 0:
            return
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
        dst = (slot // PAGE_SIZE) * stride_cache_block + (slot % PAGE_SIZE) * stride_cache_tok \
            + offs_h[:, None] * stride_cache_head + offs_d[None, :]                       # [BLOCK_H, BLOCK_D]
        k = tl.load(k_ptr + tok * stride_k_tok + offs_h[:, None] * stride_k_head + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :], mask=mask)
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, KVH, D] -> kv_cache[0/1] at flat slots slot_mapping [T] (int32 or int64; < 0 skips the token)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_d = triton.next_power_of_2(head_dim)
    block_h = triton.next_power_of_2(num_kv_heads)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        PAGE_SIZE=kv_cache.shape[2], num_warps=4 if block_h * block_d >= 1024 else 1,
    )
