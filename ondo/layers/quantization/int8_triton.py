"""The GPU kernel of `Int8Method`: x [M, K] @ (codes [N, K] int8 * scale [N]) reading the int8 bytes.

One program owns BLOCK_N output rows and a slice of K: it loads [BLOCK_N, BLOCK_K] int8 codes, widens
them to the activation dtype (exact: |code| <= 127) and multiplies on the tensor cores; the row scale
applies once at the end. Decode matrices with few rows split K across programs, the last of which adds
their partial sums (`ondo/layers/split_k.py`), as the int4 kernels do. Launch shapes depend on host
integers only (CUDA graphs).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    from ondo.layers import split_k
    from ondo.layers.split_k import store_split_k
    from ondo.layers.triton_math import programmatic_launch_options, wait_for_previous_kernel
except ImportError:  # CPU-only installs never launch these kernels
    triton = None

TARGET_PROGRAMS = 4 * 132


if triton is not None:

    @triton.jit
    def _int8_mm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_wn,
                        stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLITS: tl.constexpr, PDL: tl.constexpr):
        wait_for_previous_kernel(PDL)
        pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask, n_mask = offs_m[:, None] < M, offs_n[:, None] < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_start = split * K_PER_SPLIT
        for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_mask, other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :], mask=n_mask, other=0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))                                  # [BM, BN]
        acc = acc * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        store_split_k(acc, out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], m_mask & (offs_n[None, :] < N),
                      ws_ptr, offs_m[:, None] * N + offs_n[None, :], lock_ptr + pid_m * tl.num_programs(0) + pid_n,
                      split, SPLITS, M * N)


def int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16) @ (codes [N, K] int8 * scale [N] float32)^T -> [M, N] in x's dtype."""
    m, k = x.shape
    n = codes.shape[0]
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, block_k = 64, 128 if k % 128 == 0 else 64 if k % 64 == 0 else 32
    if k % block_k:
        raise ValueError(f"int8 kernel needs in_features divisible by 32, got {k}")
    grid_n, grid_m = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    split = 1
    while grid_n * grid_m * split * 2 <= TARGET_PROGRAMS and k % (split * 2 * block_k) == 0:
        split *= 2
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _int8_mm_kernel[(grid_n, grid_m, split)](
        x, codes, scale, out, *split_k.buffers(split, m * n, grid_n * grid_m, out), m, n, k, k // split, x.stride(0),
        codes.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=split,
        num_warps=4, num_stages=3, **programmatic_launch_options(x))
    return out
