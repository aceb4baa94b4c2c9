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


@triton.jit
def _byte_transpose(w0, w1, w2, w3):
    """Four words as the rows of a 4 x 4 byte matrix, transposed (eight PRMTs): byte k of result c is
    byte c of word k."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 lo01, hi01, lo23, hi23;
        prmt.b32 lo01, $4, $5, 0x5140;
        prmt.b32 hi01, $4, $5, 0x7362;
        prmt.b32 lo23, $6, $7, 0x5140;
        prmt.b32 hi23, $6, $7, 0x7362;
        prmt.b32 $0, lo01, lo23, 0x5410;
        prmt.b32 $1, lo01, lo23, 0x7632;
        prmt.b32 $2, hi01, hi23, 0x5410;
        prmt.b32 $3, hi01, hi23, 0x7632;
        }""",
        "=r,=r,=r,=r,r,r,r,r", [w0, w1, w2, w3], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=True, pack=1)

@triton.jit
def _nibble_dot(t, lo01, lo23, hi01, hi23):
    """sum over bytes k of t: low nibble * x_lo[k] + high nibble * x_hi[k], the x as int16 pairs (lo01
    holds x_lo[0], x_lo[1]): two masks, a shift and four IDP2As for eight weights."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 lo, hi, acc;
        and.b32 lo, $1, 0x0F0F0F0F;
        shr.u32 hi, $1, 4;
        and.b32 hi, hi, 0x0F0F0F0F;
        dp2a.lo.s32.u32 acc, $2, lo, 0;
        dp2a.hi.s32.u32 acc, $3, lo, acc;
        dp2a.lo.s32.u32 acc, $4, hi, acc;
        dp2a.hi.s32.u32 acc, $5, hi, acc;
        mov.b32 $0, acc;
        }""",
        "=r,r,r,r,r,r", [t, lo01, lo23, hi01, hi23], dtype=tl.int32, is_pure=True, pack=1)

@triton.jit
def _pair_as_floats(pair, BF16: tl.constexpr):
    """The two 16-bit floats of an int32 word (the first in the low half), as float32."""
    if BF16:
        return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)
    first = pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return first, (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

@triton.jit
def _int16_pair(a, b, inv):
    """round(a * inv), round(b * inv) as the low and high int16 of one word: 1.5 * 2^23 + v read as an
    int32 ends in v's 16 bits (|v| <= 32767), so neither needs a conversion instruction."""
    ia = tl.fma(a, inv, 12582912.0).to(tl.int32, bitcast=True)
    ib = tl.fma(b, inv, 12582912.0).to(tl.int32, bitcast=True)
    return (ia & 0xFFFF) | (ib << 16)

@triton.jit
def _chunk_x(xp_ptr, base, offs_q, K_X, BF16: tl.constexpr, EVEN_K: tl.constexpr):
    """The 32 inputs base .. base + 31 of x (xp_ptr: x as int32 pairs) as the quad rows of
    `_nibble_dot` want them, int16 with one scale for the chunk: per quad row q the pairs at
    base + 4 q (+ 2) and base + 16 + 4 q (+ 2) [4, 1]; the scale (float) and the exact sum of x."""
    idx = (base // 2 + 2 * offs_q)[:, None]                                      # [4, 1] pair index
    if EVEN_K:
        p0, p1 = tl.load(xp_ptr + idx), tl.load(xp_ptr + idx + 1)
        p2, p3 = tl.load(xp_ptr + idx + 8), tl.load(xp_ptr + idx + 9)
    else:
        half = K_X // 2
        p0, p1 = tl.load(xp_ptr + idx, mask=idx < half, other=0), tl.load(xp_ptr + idx + 1, mask=idx + 1 < half, other=0)
        p2 = tl.load(xp_ptr + idx + 8, mask=idx + 8 < half, other=0)
        p3 = tl.load(xp_ptr + idx + 9, mask=idx + 9 < half, other=0)
    a0, a1 = _pair_as_floats(p0, BF16)
    a2, a3 = _pair_as_floats(p1, BF16)
    b0, b1 = _pair_as_floats(p2, BF16)
    b2, b3 = _pair_as_floats(p3, BF16)
    top = tl.maximum(tl.maximum(tl.maximum(tl.abs(a0), tl.abs(a1)), tl.maximum(tl.abs(a2), tl.abs(a3))),
                     tl.maximum(tl.maximum(tl.abs(b0), tl.abs(b1)), tl.maximum(tl.abs(b2), tl.abs(b3))))
    amax = tl.max(top, axis=0)                                                    # [1]
    total = tl.sum((a0 + a1) + (a2 + a3) + ((b0 + b1) + (b2 + b3)), axis=0)      # [1]
    inv = tl.where(amax > 0.0, 32767.0 / amax, 0.0)[None, :]
    return (_int16_pair(a0, a1, inv), _int16_pair(a2, a3, inv), _int16_pair(b0, b1, inv),
            _int16_pair(b2, b3, inv), amax * (1.0 / 32767.0), total)

@triton.jit
def _quad_words(q_ptr, row, offs_q, offs_n, n_mask, N, EVEN_N: tl.constexpr):
    """The words of one block (word rows row .. row + 15) as four [4, BLOCK_N] tiles: tile r holds word
    rows row + 4 q + r."""
    ptrs = q_ptr + (row + 4 * offs_q)[:, None] * N + offs_n[None, :]
    if EVEN_N:
        return tl.load(ptrs), tl.load(ptrs + N), tl.load(ptrs + 2 * N), tl.load(ptrs + 3 * N)
    m = n_mask[None, :]
    return (tl.load(ptrs, mask=m, other=0), tl.load(ptrs + N, mask=m, other=0),
            tl.load(ptrs + 2 * N, mask=m, other=0), tl.load(ptrs + 3 * N, mask=m, other=0))

@triton.jit
def _chunk_product(acc, t, xp_ptr, base, offs_q, K_X, sz_ptr, g, SZ_STRIDE, offs_n, n_mask,
                   BF16: tl.constexpr, X_BF16: tl.constexpr, EVEN_K: tl.constexpr):
    """acc + one 32-input chunk's products: t [4, BLOCK_N] the chunk's bytes of the block's quad rows."""
    lo01, lo23, hi01, hi23, x_scale, x_sum = _chunk_x(xp_ptr, base, offs_q, K_X, X_BF16, EVEN_K)
    codes_x = tl.sum(_nibble_dot(t, lo01, lo23, hi01, hi23), axis=0).to(tl.float32)   # [BLOCK_N], exact
    scale, zero = _scale_and_zero(sz_ptr, g, SZ_STRIDE, offs_n, n_mask, True, BF16)
    return acc + scale * (codes_x * x_scale) + (zero - 8.0 * scale) * x_sum

@triton.jit
def _int4_gemv_dot_kernel(xp_ptr, q_ptr, sz_ptr, out_ptr, ws_ptr, lock_ptr, N, K_X, K_P, BLOCKS_PER_SPLIT, SZ_STRIDE,
                          GROUP: tl.constexpr, PLANES: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                          BF16: tl.constexpr, X_BF16: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                          PDL: tl.constexpr):
    # One row on the integer units: x rounded to int16 per chunk of 32 inputs (one scale each, the exact
    # float sum kept for the zeros), the weights' nibbles multiplied by IDP2A (two int16 x two 4-bit
    # codes a instruction). A block's word i holds inputs 16 j + i in nibble j, so byte c of every word
    # lies in chunk c (nibble 2c: input 32 c + i; 2c + 1: 32 c + 16 + i); the words of four consecutive
    # rows, byte-transposed, give per chunk one word of four bytes of that chunk. Per chunk and column
    # the integer sum is exact (|sum| < 2^24), then the group's scale and zero apply in float32:
    #   sum_k x w = scale * x_scale * sum_k v c + (zero - 8 scale) * sum_k x.
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_q = tl.arange(0, 4)
    first = split * BLOCKS_PER_SPLIT
    end = first + BLOCKS_PER_SPLIT
    w0, w1, w2, w3 = _quad_words(q_ptr, first * 16, offs_q, offs_n, n_mask, N, EVEN_N)   # plane 0, first block
    wait_for_previous_kernel(PDL)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b in tl.range(first, end):
        for p in tl.static_range(PLANES):
            if p == 0:
                c0, c1, c2, c3 = w0, w1, w2, w3
                w0, w1, w2, w3 = _quad_words(q_ptr, tl.minimum(b + 1, end - 1) * 16, offs_q, offs_n, n_mask, N, EVEN_N)
            else:
                c0, c1, c2, c3 = _quad_words(q_ptr, p * (K_P // 8) + b * 16, offs_q, offs_n, n_mask, N, EVEN_N)
            t0, t1, t2, t3 = _byte_transpose(c0, c1, c2, c3)
            g = (p * K_P + b * 128) // GROUP
            acc = _chunk_product(acc, t0, xp_ptr, b * 128, offs_q, K_X, sz_ptr, g, SZ_STRIDE, offs_n, n_mask,
                                 BF16, X_BF16, EVEN_K)
            acc = _chunk_product(acc, t1, xp_ptr, b * 128 + 32, offs_q, K_X, sz_ptr, g + 32 // GROUP, SZ_STRIDE,
                                 offs_n, n_mask, BF16, X_BF16, EVEN_K)
            acc = _chunk_product(acc, t2, xp_ptr, b * 128 + 64, offs_q, K_X, sz_ptr, g + 64 // GROUP, SZ_STRIDE,
                                 offs_n, n_mask, BF16, X_BF16, EVEN_K)
            acc = _chunk_product(acc, t3, xp_ptr, b * 128 + 96, offs_q, K_X, sz_ptr, g + 96 // GROUP, SZ_STRIDE,
                                 offs_n, n_mask, BF16, X_BF16, EVEN_K)
    store_split_k(acc, out_ptr + offs_n, n_mask, ws_ptr, offs_n, lock_ptr + pid_n, split, SPLITS, N)


GEMV_MIN_PROGRAMS = 12 * SMS   # one-warp programs: fewer leave too few loads in flight to hide their latency


def gemv_config(n: int, k_p: int, integer: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, split, num_warps) of a one-row product, from sweeps of the Llama-3-8B shapes on the H200
    (`benchmarks/int4_kernel.py --gemv-sweep`). The float kernel: one-warp programs of 64 columns, K split
    as finely as leaves each program 4 blocks (a load overlapped with the arithmetic of three), or 2
    where that gives fewer than GEMV_MIN_PROGRAMS. The integer kernel: 256 columns a program (the x of a
    block made ready once for more columns), one warp where that still gives some 800 programs (4 blocks
    each, else 2), else two warps of 2 blocks each (qkv, o)."""
    blocks = k_p // BLOCK_K

    def finest(min_blocks: int) -> int:
        return max((s for s in range(1, blocks + 1) if blocks % s == 0 and blocks // s >= min_blocks), default=1)

    if integer:
        tiles = triton.cdiv(n, 256)
        for min_blocks in (4, 2):
            if tiles * finest(min_blocks) >= INTEGER_GEMV_MIN_PROGRAMS:
                return 256, finest(min_blocks), 1
        return 256, finest(2), 2
    tiles = triton.cdiv(n, 64)
    split = finest(4)
    if tiles * split < GEMV_MIN_PROGRAMS:
        split = finest(2)
    return 64, split, 1


INTEGER_GEMV_MIN_PROGRAMS = 6 * SMS


INTEGER_GEMV = True    # the IDP2A kernel where it applies (benchmarks/int4_kernel.py switches it to compare)


def integer_gemv_serves(x: torch.Tensor, group: int) -> bool:
    """Whether `_int4_gemv_dot_kernel` takes this one-row product: on a GPU (its PTX does not run in Triton's
    interpreter), groups of 32 inputs or more (a chunk of 32 shares one x scale), x a contiguous row of
    16-bit floats read as int32 pairs."""
    return (INTEGER_GEMV and x.is_cuda and group >= 32 and x.dtype in (torch.bfloat16, torch.float16)
            and x.is_contiguous() and x.shape[-1] % 2 == 0 and x.data_ptr() % 4 == 0)


def int4_gemv(x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, planes: int,
              config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """One row x [1, K_X] (bf16/fp16) @ W^T -> [1, N] in x's dtype (`_int4_gemv_kernel`); config:
    (BLOCK_N, split, num_warps)."""
    k_x, k_p, n = _product_shape(x, words, group, planes)
    if scales_and_zeros.element_size() != 2:
        raise ValueError(f"the one-row kernel reads bf16/fp16 scales, got {scales_and_zeros.dtype}")
    integer = integer_gemv_serves(x, group)
    block_n, split, warps = config or gemv_config(n, k_p, integer)
    blocks = k_p // BLOCK_K
    if blocks % split:
        raise ValueError(f"split {split} does not divide the {blocks} blocks of K")
    tiles = triton.cdiv(n, block_n)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    sz = scales_and_zeros.view(torch.int32)                 # each (scale, zero) pair read as one word
    if integer:
        _int4_gemv_dot_kernel[(tiles, split)](
            x.view(torch.int32), words, sz, out, *split_k.buffers(split, n, tiles, out), n, k_x, k_p, blocks // split,
            sz.stride(0), GROUP=group, PLANES=planes, BLOCK_N=block_n, SPLITS=split,
            BF16=scales_and_zeros.dtype == torch.bfloat16, X_BF16=x.dtype == torch.bfloat16, EVEN_N=n % block_n == 0, EVEN_K=k_x == k_p,
            num_warps=warps, num_stages=1, **programmatic_launch_options(x))
        return out
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
