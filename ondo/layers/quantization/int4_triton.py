"""The GPU kernel of `Int4PlanesMethod`: a matrix product that reads the packed int4 tiles directly.

One program owns one tile of 64 output rows (a [K, 32]-byte slab: low nibbles are rows 0-31, high
nibbles rows 32-63) and walks K one scale group at a time: the group's codes multiply a
[BLOCK_M, group] slice of the activations on the tensor cores, then its scale and zero apply once
per output. Decode reads each weight
byte once; when the tiles alone cannot fill the GPU (a 4096-row matrix has 64), the K axis is split
across programs that add into a float32 output. Every launch shape depends only on host integers, so
the kernel is captured inside the decode CUDA graphs. Batches above `FUSED_MAX_TOKENS` (prefill, large
decode batches) dequantize into a bfloat16 scratch matrix with a second kernel and use cuBLAS.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs never launch these kernels
    triton = None

TILE_N = 64
TARGET_PROGRAMS = 4 * 132  # enough resident programs on a 132-SM Hopper GPU to keep loads in flight


if triton is not None:

    @triton.jit
    def _int4_tiles_mm_kernel(
        x_ptr, q_ptr, sz_ptr, out_ptr, M, N_PAD, K, K_PER_SPLIT, stride_xm, stride_om,
        GROUP: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, BLOCK_M: tl.constexpr, ATOMIC: tl.constexpr,
    ):
        # Per group the codes (exact small integers in bfloat16) meet the activations on the tensor
        # cores, and the group's scale and zero apply once per output afterwards:
        # sum_k x_k ((c_k - 8) s + z) = s * sum_k x_k (c_k - 8) + z * sum_k x_k.
        # Several groups per step (unrolled) keep enough weight bytes in flight to fill the memory bus.
        tile, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, 32)
        offs_g = tl.arange(0, GROUP)
        rows_lo = tile * 64 + offs_d                                                   # [32]
        m_mask = offs_m[:, None] < M
        acc_lo = tl.zeros([BLOCK_M, 32], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_M, 32], dtype=tl.float32)
        k_start = split * K_PER_SPLIT
        for k_step in range(k_start, k_start + K_PER_SPLIT, GROUP * GROUPS_PER_STEP):
            for j in tl.static_range(GROUPS_PER_STEP):
                k0 = k_step + j * GROUP
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_g)[None, :], mask=m_mask, other=0.0)
                packed = tl.load(q_ptr + tile * K * 32 + (k0 + offs_g)[:, None] * 32 + offs_d[None, :])  # [G, 32]
                sz = sz_ptr + (k0 // GROUP) * N_PAD * 2
                s_lo = tl.load(sz + rows_lo * 2).to(tl.float32)
                z_lo = tl.load(sz + rows_lo * 2 + 1).to(tl.float32)
                s_hi = tl.load(sz + rows_lo * 2 + 64).to(tl.float32)
                z_hi = tl.load(sz + rows_lo * 2 + 65).to(tl.float32)
                c_lo = ((packed & 15).to(tl.int32) - 8).to(x.dtype)                     # [G, 32]
                c_hi = ((packed >> 4).to(tl.int32) - 8).to(x.dtype)
                x_sum = tl.sum(x.to(tl.float32), axis=1)[:, None]                       # [BM, 1]
                acc_lo += tl.dot(x, c_lo) * s_lo[None, :] + x_sum * z_lo[None, :]
                acc_hi += tl.dot(x, c_hi) * s_hi[None, :] + x_sum * z_hi[None, :]
        out = out_ptr + offs_m[:, None] * stride_om
        if ATOMIC:
            tl.atomic_add(out + rows_lo[None, :], acc_lo, mask=m_mask)
            tl.atomic_add(out + rows_lo[None, :] + 32, acc_hi, mask=m_mask)
        else:
            tl.store(out + rows_lo[None, :], acc_lo.to(out_ptr.dtype.element_ty), mask=m_mask)
            tl.store(out + rows_lo[None, :] + 32, acc_hi.to(out_ptr.dtype.element_ty), mask=m_mask)

    @triton.jit
    def _int4_tiles_dequant_kernel(q_ptr, sz_ptr, out_ptr, N_PAD, K, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
        # Writes W^T [K, N_pad]: a tile's 64 rows are 64 consecutive outputs, so stores coalesce.
        tile, kb = tl.program_id(0), tl.program_id(1)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_d = tl.arange(0, 32)
        rows_lo = tile * 64 + offs_d
        packed = tl.load(q_ptr + tile * K * 32 + offs_k[:, None] * 32 + offs_d[None, :])       # [BK, 32]
        sz = sz_ptr + (offs_k[:, None] // GROUP) * N_PAD * 2
        w_lo = ((packed & 15).to(tl.float32) - 8.0) * tl.load(sz + rows_lo[None, :] * 2).to(tl.float32) \
            + tl.load(sz + rows_lo[None, :] * 2 + 1).to(tl.float32)
        w_hi = ((packed >> 4).to(tl.float32) - 8.0) * tl.load(sz + rows_lo[None, :] * 2 + 64).to(tl.float32) \
            + tl.load(sz + rows_lo[None, :] * 2 + 65).to(tl.float32)
        out = out_ptr + offs_k[:, None] * N_PAD + rows_lo[None, :]
        tl.store(out, w_lo.to(out_ptr.dtype.element_ty))
        tl.store(out + 32, w_hi.to(out_ptr.dtype.element_ty))


# Up to this batch the fused kernel reads the packed bytes once; above it, dequantizing into a scratch
# matrix and calling cuBLAS is faster (benchmarks/int4_kernel.py).
FUSED_MAX_TOKENS = 16


def int4_tiles_mm(x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] (bf16/fp16, contiguous) @ tiles -> [M, N_pad] in x's dtype."""
    m, k = x.shape
    n_pad = qweight.shape[0]
    tiles = n_pad // TILE_N
    if m > FUSED_MAX_TOKENS:
        w_t = torch.empty(k, n_pad, dtype=x.dtype, device=x.device)                  # [K, N_pad]
        block_k = 64 if k % 64 == 0 else 32
        _int4_tiles_dequant_kernel[(tiles, k // block_k)](qweight, scales_and_zeros, w_t, n_pad, k,
                                                          GROUP=group, BLOCK_K=block_k, num_warps=4)
        return x @ w_t
    groups = k // group
    per_step = 4 if groups % 4 == 0 else 2 if groups % 2 == 0 else 1
    block_m = 16
    # Split K only while the tiles cannot fill the GPU, and only into whole steps.
    split = 1
    while tiles * split * 2 <= TARGET_PROGRAMS and groups % (split * 2 * per_step) == 0:
        split *= 2
    atomic = split > 1
    out = torch.zeros(m, n_pad, dtype=torch.float32, device=x.device) if atomic else \
        torch.empty(m, n_pad, dtype=x.dtype, device=x.device)
    _int4_tiles_mm_kernel[(tiles, 1, split)](
        x, qweight, scales_and_zeros, out, m, n_pad, k, k // split, x.stride(0), out.stride(0),
        GROUP=group, GROUPS_PER_STEP=per_step, BLOCK_M=block_m, ATOMIC=atomic, num_warps=4, num_stages=3)
    return out.to(x.dtype) if atomic else out
