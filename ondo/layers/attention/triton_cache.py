"""Writing a step's new K/V into the paged cache (reshape-and-cache) in one Triton launch.

One program per token copies its [KVH, D] keys and values to slot `slot_mapping[t]`. A negative slot
means "no token here" (CUDA-graph padding) and is skipped, so padded batches need no dummy block.
k and v may be strided views (e.g. slices of a fused QKV projection); only the last dim must be dense.

`rotate_and_write_kv` does in the same launch what the attention layer does before the write: the
per-head RMSNorm of q and k (Qwen3, Gemma 3) and the rotary embedding, rounding where `fused.rms_norm`
and `fused.apply_rotary_` round. A decode step then spends one launch a layer where it spent two to
four (on the H200 each is a ~1.5 us kernel plus its gap inside the CUDA graph).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    from ondo.layers.triton_math import norm_and_rotate_heads, programmatic_launch_options, wait_for_previous_kernel
except ImportError:  # CPU-only installs never launch these kernels
    triton = None

if triton is not None:

    @triton.jit
    def _write_kv_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
        stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
        stride_cache_block, stride_cache_tok, stride_cache_head,
        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGE_SIZE: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_for_previous_kernel(PDL)
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
        **programmatic_launch_options(k),
    )


if triton is not None:

    @triton.jit
    def _rotate_and_write_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_w_ptr, k_w_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
        stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head, stride_cos,
        stride_cache_block, stride_cache_tok, stride_cache_head, eps, offset,
        NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_NORM: tl.constexpr,
        HAS_OFFSET: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_for_previous_kernel(PDL)
        tok = tl.program_id(0).to(tl.int64)
        offs_i = tl.arange(0, BLOCK_HALF)
        cos = tl.load(cos_ptr + tok * stride_cos + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + tok * stride_cos + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
        norm_and_rotate_heads(q_ptr, tok, stride_q_tok, stride_q_head, cos, sin, q_w_ptr, eps, offset,
                              NUM_Q_HEADS, HALF, BLOCK_HQ, BLOCK_HALF, HAS_NORM, HAS_OFFSET)
        k1, k2 = norm_and_rotate_heads(k_ptr, tok, stride_k_tok, stride_k_head, cos, sin, k_w_ptr, eps, offset,
                                  NUM_KV_HEADS, HALF, BLOCK_HK, BLOCK_HALF, HAS_NORM, HAS_OFFSET)
        slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
        if slot >= 0:   # < 0: CUDA-graph padding, no cache slot
            offs_h = tl.arange(0, BLOCK_HK)
            mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_i < HALF)[None, :]
            dst = (slot // PAGE_SIZE) * stride_cache_block + (slot % PAGE_SIZE) * stride_cache_tok \
                + offs_h[:, None] * stride_cache_head + offs_i[None, :]                   # [BLOCK_HK, BLOCK_HALF]
            v_first = v_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_i[None, :]
            tl.store(k_cache_ptr + dst, k1, mask=mask)
            tl.store(k_cache_ptr + dst + HALF, k2, mask=mask)
            tl.store(v_cache_ptr + dst, tl.load(v_first, mask=mask), mask=mask)
            tl.store(v_cache_ptr + dst + HALF, tl.load(v_first + HALF, mask=mask), mask=mask)


def rotate_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        kv_cache: torch.Tensor, slot_mapping: torch.Tensor, head_norms=None) -> None:
    """q [T, H, D] and k [T, KVH, D] normed per head (head_norms: the (q, k) RMSNorm modules, or None) and
    rotated in place with cos / sin [T, D] (neox layout, full rotation: rot_dim == D); k and v [T, KVH, D]
    then written to kv_cache at slot_mapping [T] (< 0 skips the token), as `write_kv_cache` does."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if cos.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"rotate_and_write_kv rotates whole heads: cos.shape[-1] must be head_dim {head_dim}, "
                         f"got {cos.shape[-1]}")
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("cos and sin must share one layout, dense in the last dim")
    if num_tokens == 0:
        return
    eps, offset, q_w, k_w = 0.0, 0.0, q, k
    if head_norms is not None:
        q_norm, k_norm = head_norms
        if (q_norm.eps, q_norm.offset) != (k_norm.eps, k_norm.offset):
            raise ValueError("the q and k head norms must share eps and offset")
        eps, offset, q_w, k_w = q_norm.eps, q_norm.offset, q_norm.weight, k_norm.weight
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    half = head_dim // 2
    _rotate_and_write_kernel[(num_tokens,)](
        q, k, v, cos, sin, q_w, k_w, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), eps, offset,
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), PAGE_SIZE=kv_cache.shape[2], HAS_NORM=head_norms is not None,
        HAS_OFFSET=offset != 0.0, num_warps=4, enable_fp_fusion=False, **programmatic_launch_options(q))
