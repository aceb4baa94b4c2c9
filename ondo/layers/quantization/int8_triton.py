"""The GPU kernels of `Int8Method`: x [M, K] @ (codes [N, K] int8 * scale [N]) reading the int8 bytes.

One program owns BLOCK_N output rows and a slice of K: it loads [BLOCK_N, BLOCK_K] int8 codes, widens
them to the activation dtype (exact: |code| <= 127) and multiplies on the tensor cores; the row scale
applies once at the end. Decode matrices with few rows split K across programs, the last of which adds
their partial sums (`ondo/layers/split_k.py`), as the int4 kernels do. Launch shapes depend on host
integers only (CUDA graphs).

More than KERNEL_MAX_TOKENS rows (prefill chunks, large decode batches) dequantize the matrix once
(`int8_dequant`) and take the dense product: 256 x (512 + 256) on the Llama-3-8B shape went from 4,491
to 7,919 tok/s on an H200 (bf16 9,624, int4 7,970 in the same run).

One row (single-stream decode) takes `int8_gemv` instead, on the CUDA cores: the widening conversion
(int8 to float) issues at a quarter of the FMA rate on an H100/H200, which held the tensor-core kernel's
one-row products to ~2.2 TB/s of codes. The GEMV reads the codes as int32 words and makes each byte a
float with one mask, as `int4_gemv` does its nibbles (the bits of a number below 2^24 are that number
times 2^-149 as a float32), the activations scaled once per input to meet it. On
an H200 the one-row products of the Llama-3-8B layer stack (32 distinct layers in one CUDA graph) take
2.00 ms (2.27 with each byte made the float 2^23 + code + 128 and subtracted, in the same run; 3.25 with
the tensor-core kernel), and one stream decodes at 352 tok/s (327 with the tensor-core kernel, 355 with
the subtracting GEMV: the stack's gain does not show end to end, which is not yet understood;
`benchmarks/latency.py --model llama3-8b --load-format dummy --quantization int8`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    from ondo.layers import split_k
    from ondo.layers.split_k import store_split_k
    from ondo.layers.triton_math import (field_as_float, meet_field, programmatic_launch_options,
                                         unscale_field_products, wait_for_previous_kernel)
except ImportError:  # CPU-only installs never launch these kernels
    triton = None

TARGET_PROGRAMS = 4 * 132
# Above this many rows `int8_linear` dequantizes the matrix once (a Triton pass: 1 byte read and 2
# written per weight) and multiplies with cuBLAS; the tensor-core kernel reads each weight tile again
# for every 64 rows, at a fraction of cuBLAS's rate. H200, Llama-3-8B layer stack
# (`benchmarks/int4_kernel.py --method int8`), kernel / dequantize + cuBLAS / bf16 ms at 64, 128, 256,
# 1,024 rows: 5.1 / 9.6 / 3.9, 8.9 / 10.0 / 4.3, 16.0 / 11.2 / 6.2, 63.2 / 26.1 / 21.8.
KERNEL_MAX_TOKENS = 128


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


    @triton.jit
    def _int8_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # out [N, K] = code * scale[n]: the product in float32, rounded once to out's dtype, as
        # `Int8Method._rows` computes it (so the dense GEMM after it is the dense model's own product).
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        mask = n_mask[:, None] & (offs_k < K)[None, :]
        codes = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], mask=mask, other=0)
        scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
        out = codes.to(tl.float32) * scale[:, None]
        tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
        # out[n] = scale[n] * sum_k x[k] code[n, k] for BLOCK_N rows, BLOCK_K inputs (BLOCK_K / 4 words)
        # at a time; word w of a row holds input 4 w + b in byte b. u = word ^ 0x80808080 holds code + 128
        # in each byte; a byte becomes a float with one mask (`field_as_float`) and meets x, scaled once per
        # input (`meet_field`), in one FMA: sum_k x code = 2^73 sum_k x u 2^-73 - 128 sum_k x. Each
        # step's words load before the arithmetic of the step before, and the first before the PDL wait
        # (no kernel of a step writes weights, so they stream in while the previous kernel ends).
        BLOCK_W: tl.constexpr = BLOCK_K // 4
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = w_ptr + offs_n[:, None].to(tl.int64) * (stride_wn // 4)
        offs_w = tl.arange(0, BLOCK_W)
        words = _int8_words(rows, offs_w, n_mask, K // 4, EVEN_N)
        acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        x_sum = tl.zeros([BLOCK_W], dtype=tl.float32)
        wait_for_previous_kernel(PDL)
        for k0 in range(0, K, BLOCK_K):
            u = words ^ -2139062144                                                        # 0x80808080
            words = _int8_words(rows, (k0 + BLOCK_K) // 4 + offs_w, n_mask, K // 4, EVEN_N)   # none past K
            offs_k = k0 + 4 * offs_w
            for b in tl.static_range(4):
                if EVEN_K:
                    x = tl.load(x_ptr + offs_k + b).to(tl.float32)
                else:
                    x = tl.load(x_ptr + offs_k + b, mask=offs_k + b < K, other=0.0).to(tl.float32)
                x_sum += x
                acc += field_as_float(u, 8 * b, 8) * meet_field(x, 8 * b, 8)[None, :]
        y = unscale_field_products(tl.sum(acc, axis=1)) - 128.0 * tl.sum(x_sum, axis=0)
        y = y * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _int8_words(rows, offs_w, n_mask, K_WORDS, EVEN_N: tl.constexpr):
        """[BLOCK_N, BLOCK_W] words of the rows at word offsets offs_w, zero past K (or N)."""
        mask = (offs_w < K_WORDS)[None, :]
        if not EVEN_N:
            mask = mask & n_mask[:, None]
        return tl.load(rows + offs_w[None, :], mask=mask, other=0)


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of a one-row product, from a sweep of the Llama-3-8B shapes on the
    H200: 8 rows of 2,048 inputs a program (8 KB of codes in flight, and as much prefetched)."""
    return (8, 2048, 4) if k >= 2048 else (8, 1024, 4)


def int8_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
              config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """One row x [1, K] (bf16/fp16) @ (codes [N, K] int8 * scale [N] float32)^T -> [1, N] in x's dtype;
    K a multiple of 4, codes' rows dense."""
    n, k = codes.shape
    if k % 4 or codes.stride(1) != 1 or codes.stride(0) % 4 or codes.storage_offset() % 4:
        raise ValueError(f"the one-row int8 kernel reads rows of whole int32 words, got codes {tuple(codes.shape)} "
                         f"with strides {codes.stride()}")
    block_n, block_k, warps = config or gemv_config(n, k)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _int8_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, codes.view(torch.int32), scale, out, n, k, codes.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0, num_warps=warps, num_stages=1,
        **programmatic_launch_options(x))
    return out


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16/fp16, M > 1) @ (codes [N, K] int8 * scale [N] float32)^T with the path the batch
    calls for: the tensor-core kernel up to KERNEL_MAX_TOKENS rows, else the matrix dequantized once
    and the dense product (cuBLAS)."""
    if x.shape[0] > KERNEL_MAX_TOKENS:
        return F.linear(x, int8_dequant(codes, scale, x.dtype))
    return int8_mm(x, codes, scale)


def int8_dequant(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense W [N, K] in `dtype` (code * scale in float32, rounded once); codes' rows may be strided."""
    n, k = codes.shape
    if codes.stride(1) != 1:
        raise ValueError(f"int8_dequant reads rows of contiguous codes, got strides {codes.stride()}")
    out = torch.empty(n, k, dtype=dtype, device=codes.device)
    _int8_dequant_kernel[(triton.cdiv(n, 32), triton.cdiv(k, 256))](
        codes, scale, out, n, k, codes.stride(0), BLOCK_N=32, BLOCK_K=256, num_warps=4)
    return out


def int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
            config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16) @ (codes [N, K] int8 * scale [N] float32)^T -> [M, N] in x's dtype;
    `config`: (BLOCK_M, BLOCK_N, num_warps, num_stages), else chosen by M."""
    m, k = x.shape
    n = codes.shape[0]
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, warps, stages = 64, 4, 3
    if config is not None:
        block_m, block_n, warps, stages = config
    block_k = 128 if k % 128 == 0 else 64 if k % 64 == 0 else 32
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
        num_warps=warps, num_stages=stages, **programmatic_launch_options(x))
    return out
