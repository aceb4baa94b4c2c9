"""The Triton kernels over the GPU int4 layout (`int4_gpu.py`, where the layout and the choice of
kernel by batch size are described)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ondo.layers import split_k
from ondo.layers.quantization.int4_gpu import BLOCK_K, padded_k
from ondo.layers.split_k import store_split_k
from ondo.layers.triton_math import (field_as_float, meet_field, programmatic_launch_options,
                                     unscale_field_products, wait_for_previous_kernel)

SMS = 132                   # H100/H200; more programs than this only matter as "enough"
FUSED_MAX_TOKENS = 32       # between the measured 17 rows (fused 2x faster) and 64 (dequantize wins)

# Inside the kernels 128 is BLOCK_K and 16 is int4_gpu.SLICE, written as literals: a Triton kernel
# reads only constexpr globals.


@triton.jit
def _scale_and_zero(sz_ptr, g, sz_stride, offs_n, n_mask, PAIRED: tl.constexpr, BF16: tl.constexpr):
    """Group g's scale and zero per output, as float32 [BLOCK_N]."""
    if PAIRED:   # a 16-bit pair read as one int32: one coalesced load instead of two strided ones
        pair = tl.load(sz_ptr + g * sz_stride + offs_n, mask=n_mask, other=0)
        half = tl.bfloat16 if BF16 else tl.float16
        scale = pair.to(tl.int16).to(half, bitcast=True).to(tl.float32)
        zero = (pair >> 16).to(tl.int16).to(half, bitcast=True).to(tl.float32)
    else:
        scale = tl.load(sz_ptr + g * sz_stride + 2 * offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(sz_ptr + g * sz_stride + 2 * offs_n + 1, mask=n_mask, other=0.0).to(tl.float32)
    return scale, zero

@triton.jit
def _dequant_slice(words, scale, zero, j: tl.constexpr):
    """Slice j of a block as float32 weights [16, BLOCK_N]."""
    bits = ((words >> (4 * j)) & 15) | 0x4B000000                                  # float 2^23 + code
    centred = bits.to(tl.float32, bitcast=True) - 8388616.0                        # code - 8, exact
    return centred * scale[None, :] + zero[None, :]

@triton.jit
def _int4_mm_kernel(
    x_ptr, q_ptr, sz_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K_X, K_P, K_PER_SPLIT, stride_xm, stride_om, SZ_STRIDE,
    GROUP: tl.constexpr, PLANES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, PAIRED: tl.constexpr, BF16: tl.constexpr,
):
    # K_P: one plane's padded K. A second plane's weights are added in float32 before the one
    # rounding to the activation dtype, so a 5- to 8-bit weight is rounded once, as a dense one is.
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, 16)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, 128):
        words = tl.load(q_ptr + (k0 // 8 + offs_i)[:, None] * N + offs_n[None, :],
                        mask=n_mask[None, :], other=0)                                  # [16, BN]
        if PLANES == 2:
            words_hi = tl.load(q_ptr + ((K_P + k0) // 8 + offs_i)[:, None] * N + offs_n[None, :],
                               mask=n_mask[None, :], other=0)
        for j in tl.static_range(8):
            g = (k0 + 16 * j) // GROUP
            scale, zero = _scale_and_zero(sz_ptr, g, SZ_STRIDE, offs_n, n_mask, PAIRED, BF16)
            w = _dequant_slice(words, scale, zero, j)
            if PLANES == 2:
                scale, zero = _scale_and_zero(sz_ptr, g + K_P // GROUP, SZ_STRIDE, offs_n, n_mask, PAIRED, BF16)
                w += _dequant_slice(words_hi, scale, zero, j)
            k_x = k0 + 16 * j + offs_i
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_x[None, :],
                        mask=m_mask[:, None] & (k_x < K_X)[None, :], other=0.0)        # [BM, 16]
            acc = tl.dot(x, w.to(x.dtype), acc)
    store_split_k(acc, out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], m_mask[:, None] & n_mask[None, :],
                  ws_ptr, offs_m[:, None] * N + offs_n[None, :], lock_ptr + pid_m * tl.num_programs(0) + pid_n,
                  split, SPLITS, M * N)

@triton.jit
def _int4_dequant_kernel(q_ptr, sz_ptr, out_ptr, N, Q_STRIDE, SZ_STRIDE, K_P, PLANES: tl.constexpr,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    # W^T [K_P, N]: row k sums the planes' weights at k; stores coalesce along N.
    kb, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, 16)
    n_mask = offs_n < N
    for j in tl.static_range(8):
        w = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for p in tl.static_range(PLANES):
            k0 = p * K_P + kb * 128
            words = tl.load(q_ptr + (k0 // 8 + offs_i)[:, None] * Q_STRIDE + offs_n[None, :],
                            mask=n_mask[None, :], other=0)
            scale, zero = _scale_and_zero(sz_ptr, (k0 + 16 * j) // GROUP, SZ_STRIDE, offs_n, n_mask, False, False)
            w += _dequant_slice(words, scale, zero, j)
        rows = kb * 128 + 16 * j + offs_i
        tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=n_mask[None, :])


@triton.jit
def _word_rows(q_ptr, row, offs_i, offs_n, n_mask, N, EVEN_N: tl.constexpr):
    """The [16, BLOCK_N] words of one block (word rows row .. row + 15)."""
    ptrs = q_ptr + (row + offs_i)[:, None] * N + offs_n[None, :]
    if EVEN_N:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=n_mask[None, :], other=0)

@triton.jit
def _int4_gemv_kernel(x_ptr, q_ptr, sz_ptr, out_ptr, ws_ptr, lock_ptr, N, K_X, K_P, BLOCKS_PER_SPLIT, SZ_STRIDE,
                      GROUP: tl.constexpr, PLANES: tl.constexpr, BLOCK_N: tl.constexpr, RUN: tl.constexpr,
                      SPLITS: tl.constexpr, BF16: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                      PDL: tl.constexpr):
    # One row: out[n] = sum_k x[k] w[n, k] on the CUDA cores (a one-row tile would waste 15/16 of the
    # tensor cores). The issue slots bound it, so a weight costs as few instructions as can be had: the
    # [16, BLOCK_N] tile of a block sits in few threads per column (Triton 3.6 lays [16, 64] out as 8 word
    # rows x 4 columns a thread, two threads a column), so the sums over word rows are in-thread adds and
    # one shuffle; a nibble becomes a float
    # with one mask (`field_as_float`) and meets x, scaled once per input (`meet_field`), in one FMA;
    # a group's scale and zero apply once per column, from
    #   sum_k x w = sum_groups 2^73 scale * sum_k x c 2^-73 + (zero - 8 scale) * sum_k x.
    # The next block's words load while this block's arithmetic runs, the first before the PDL wait
    # (no kernel of a step writes weights).
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_i = tl.arange(0, 16)
    first = split * BLOCKS_PER_SPLIT
    end = first + BLOCKS_PER_SPLIT
    words = _word_rows(q_ptr, first * 16, offs_i, offs_n, n_mask, N, EVEN_N)           # plane 0, first block
    wait_for_previous_kernel(PDL)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b in tl.range(first, end):
        for p in tl.static_range(PLANES):
            if p == 0:
                cur = words
                words = _word_rows(q_ptr, tl.minimum(b + 1, end - 1) * 16, offs_i, offs_n, n_mask, N, EVEN_N)
            else:
                cur = _word_rows(q_ptr, p * (K_P // 8) + b * 16, offs_i, offs_n, n_mask, N, EVEN_N)
            for run in tl.static_range(8 // RUN):          # RUN slices of 16 inputs share a group
                for jj in tl.static_range(RUN):
                    j = run * RUN + jj
                    k = b * 128 + 16 * j + offs_i
                    if EVEN_K:
                        x = tl.load(x_ptr + k).to(tl.float32)
                    else:
                        x = tl.load(x_ptr + k, mask=k < K_X, other=0.0).to(tl.float32)
                    terms = field_as_float(cur, 4 * j, 4) * meet_field(x, 4 * j, 4)[:, None]   # [16, BLOCK_N]
                    if jj == 0:
                        part, x_sum = terms, x
                    else:
                        part, x_sum = part + terms, x_sum + x
                g = (p * K_P + b * 128 + 16 * run * RUN) // GROUP
                scale, zero = _scale_and_zero(sz_ptr, g, SZ_STRIDE, offs_n, n_mask, True, BF16)
                acc += unscale_field_products(scale) * tl.sum(part, axis=0) \
                    + (zero - 8.0 * scale) * tl.sum(x_sum, axis=0)
    store_split_k(acc, out_ptr + offs_n, n_mask, ws_ptr, offs_n, lock_ptr + pid_n, split, SPLITS, N)


GEMV_MIN_PROGRAMS = 12 * SMS   # one-warp programs: fewer leave too few loads in flight to hide their latency


def gemv_config(n: int, k_p: int) -> tuple[int, int, int]:
    """(BLOCK_N, split, num_warps) of a one-row product, from a sweep of the Llama-3-8B shapes on the
    H200: one-warp programs of 64 columns; K split as finely as leaves each program 4 blocks (a load
    overlapped with the arithmetic of three), or 2 where that gives fewer than GEMV_MIN_PROGRAMS."""
    block_n = 64
    tiles = triton.cdiv(n, block_n)
    blocks = k_p // BLOCK_K

    def finest(min_blocks: int) -> int:
        return max((s for s in range(1, blocks + 1) if blocks % s == 0 and blocks // s >= min_blocks), default=1)

    split = finest(4)
    if tiles * split < GEMV_MIN_PROGRAMS:
        split = finest(2)
    return block_n, split, 1


def int4_gemv(x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, planes: int,
              config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """One row x [1, K_X] (bf16/fp16) @ W^T -> [1, N] in x's dtype (`_int4_gemv_kernel`); config:
    (BLOCK_N, split, num_warps)."""
    k_x, k_p, n = _product_shape(x, words, group, planes)
    if scales_and_zeros.element_size() != 2:
        raise ValueError(f"the one-row kernel reads bf16/fp16 scales, got {scales_and_zeros.dtype}")
    block_n, split, warps = config or gemv_config(n, k_p)
    blocks = k_p // BLOCK_K
    if blocks % split:
        raise ValueError(f"split {split} does not divide the {blocks} blocks of K")
    tiles = triton.cdiv(n, block_n)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    sz = scales_and_zeros.view(torch.int32)                 # each (scale, zero) pair read as one word
    _int4_gemv_kernel[(tiles, split)](
        x, words, sz, out, *split_k.buffers(split, n, tiles, out), n, k_x, k_p, blocks // split, sz.stride(0),
        GROUP=group, PLANES=planes, BLOCK_N=block_n, RUN=min(group // 16, 8), SPLITS=split,
        BF16=scales_and_zeros.dtype == torch.bfloat16, EVEN_N=n % block_n == 0, EVEN_K=k_x == k_p,
        num_warps=warps, num_stages=1, **programmatic_launch_options(x))
    return out


def kernel_config(m: int, n: int, k_p: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, split, num_warps) for an [m, K] x [K, n] product, from a sweep on the H200.

    Decode is bound by how many weight loads are in flight, so small batches spread K over many
    short programs (up to ~16 per SM); larger batches keep longer programs and bigger tiles."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 128 if m == 1 or m > 16 else 256
    warps = 2 if m == 1 else 4
    target = (16 if m <= 16 else 4) * SMS
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    blocks = k_p // BLOCK_K
    split = 1
    while tiles * split * 2 <= target and blocks % (split * 2) == 0:
        split *= 2
    return block_m, block_n, split, warps


def int4_mm(x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, planes: int,
            config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K_X] (bf16/fp16, contiguous) @ W^T -> [M, N] in x's dtype (W: the planes summed)."""
    m = x.shape[0]
    k_x, k_p, n = _product_shape(x, words, group, planes)
    block_m, block_n, split, warps = config or kernel_config(m, n, k_p)
    if (k_p // BLOCK_K) % split:
        raise ValueError(f"split {split} does not divide the {k_p // BLOCK_K} blocks of K")
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    paired = scales_and_zeros.element_size() == 2
    sz = scales_and_zeros.view(torch.int32) if paired else scales_and_zeros
    _int4_mm_kernel[grid](x, words, sz, out, *split_k.buffers(split, m * n, grid[0] * grid[1], out), m, n, k_x, k_p,
                          k_p // split, x.stride(0), out.stride(0), sz.stride(0), GROUP=group, PLANES=planes,
                          BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=split, PAIRED=paired,
                          BF16=scales_and_zeros.dtype == torch.bfloat16, num_warps=warps, num_stages=3)
    return out


def _product_shape(x: torch.Tensor, words: torch.Tensor, group: int, planes: int) -> tuple[int, int, int]:
    """(K_X, K_P, N) of x [M, K_X] @ W^T, W's words checked to hold `planes` planes of K_P inputs."""
    k_x = x.shape[1]
    k_p, n = padded_k(k_x, group), words.shape[1]
    if planes not in (1, 2) or words.shape[0] * 8 != planes * k_p:
        raise ValueError(f"expected {planes} plane(s) of {k_p} inputs, got words of shape {tuple(words.shape)}")
    return k_x, k_p, n


def int4_dequant(words: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, k_x: int, planes: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The dense W^T [K_X, N] in `dtype`, planes summed. `words` / `scales_and_zeros` may be column
    slices (output rows) of a layer's buffers."""
    n = words.shape[1]
    k_p = padded_k(k_x, group)
    out = torch.empty(k_p, n, dtype=dtype, device=words.device)
    block_n = 128
    _int4_dequant_kernel[(k_p // BLOCK_K, triton.cdiv(n, block_n))](
        words, scales_and_zeros, out, n, words.stride(0), scales_and_zeros.stride(0), k_p,
        PLANES=planes, GROUP=group, BLOCK_N=block_n, num_warps=4)
    return out[:k_x]


def int4_linear(x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                planes: int) -> torch.Tensor:
    """x [M, K] @ W^T with the kernel the batch size calls for."""
    if x.shape[0] == 1 and scales_and_zeros.element_size() == 2:
        return int4_gemv(x, words, scales_and_zeros, group, planes)
    if x.shape[0] <= FUSED_MAX_TOKENS:
        return int4_mm(x, words, scales_and_zeros, group, planes)
    return x @ int4_dequant(words, scales_and_zeros, group, x.shape[1], planes, x.dtype)
