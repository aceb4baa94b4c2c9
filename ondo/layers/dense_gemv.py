"""One-row products with dense half-precision weights on a GPU (single-stream decode): a Triton GEMV.

For one row cuBLAS picks poorly against the small matrices of small models. On an H200, 28 distinct
Qwen3-0.6B layers in one CUDA graph: o_proj [1024, 2048] takes 10.1 us (0.42 TB/s), down_proj
[1024, 3072] 6.6 us; the whole model's products 0.85 ms a token. Here each program reduces
BLOCK_N = 2 output rows over K, 1024 inputs at a time, in float32: N / 2 programs keep every SM
streaming, and rows of K contiguous bf16 coalesce. The same products take 3.3 and 4.0 us, the model's
0.53 ms; Llama-3-8B's 3.77 against 3.95 ms (its large matrices were already near the copy bandwidth).
Figures from `benchmarks/results/h200-gemv.json`.
That was the best of a sweep of BLOCK_N 2-64, BLOCK_K 128-1024, 4 or 8 warps, 1 or 3 stages over
every projection of both models and their LM heads; `benchmarks/gemv.py` times it beside cuBLAS.

Imported only on a GPU, and used only where the forward runs the fused kernels (`fused_ops_enabled`:
not under enforce_eager, which keeps F.linear as the reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 2
BLOCK_K = 1024


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    # out[n] = sum_k x[k] w[n, k] (+ bias[n]), for BLOCK_N rows n of W [N, K].
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + offs_k)
            w = tl.load(rows + offs_k[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
            w = tl.load(rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias [N]) -> [1, N] in x's dtype; x contiguous, weight rows dense."""
    n, k = weight.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, weight, bias if bias is not None else x, out, n, k, weight.stride(0), HAS_BIAS=bias is not None,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN_K=k % BLOCK_K == 0, num_warps=4, num_stages=1)
    return out
