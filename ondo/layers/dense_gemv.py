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

For a merged [gate | up] matrix it can also apply the MLP's activation (`gated`): one launch fewer a layer.

Imported only on a GPU, and used only where the forward runs the fused kernels (`fused_ops_enabled`:
not under enforce_eager, which keeps F.linear as the reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ondo.layers.triton_math import gated_value, programmatic_launch_options, wait_for_previous_kernel

BLOCK_N = 2
BLOCK_K = 1024


@triton.jit
def _weight_block(rows, offs_k, n_mask, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(rows + offs_k[None, :], mask=n_mask[:, None], other=0.0)
    return tl.load(rows + offs_k[None, :], mask=n_mask[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def _input_block(x_ptr, offs_k, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(x_ptr + offs_k).to(tl.float32)
    return tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr,
                 GELU_TANH: tl.constexpr, PDL: tl.constexpr):
    # out[n] = sum_k x[k] w[n, k] (+ bias[n]), for BLOCK_N rows n of W [N, K].
    # GATED: W is [gate | up] (N = 2 I); a program takes gate row c and up row c + I (BLOCK_N = 2) and
    # stores act(gate) * up at c, so the MLP's activation costs no launch of its own.
    if GATED:
        offs_n = tl.program_id(0) + tl.arange(0, 2) * (N // 2)
    else:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    # The first block of weights is read before waiting for the previous kernel (PDL): no kernel of a
    # step writes the weights, so they stream in while that kernel finishes.
    offs_k = tl.arange(0, BLOCK_K)
    w = _weight_block(rows, offs_k, n_mask, K, EVEN_K)
    wait_for_previous_kernel(PDL)
    acc = w.to(tl.float32) * _input_block(x_ptr, offs_k, K, EVEN_K)[None, :]      # [BLOCK_N, BLOCK_K]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        acc += _weight_block(rows, offs_k, n_mask, K, EVEN_K).to(tl.float32) * \
            _input_block(x_ptr, offs_k, K, EVEN_K)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    if GATED:   # gate and up rounded as the product's output would be, then act(gate) * up
        gate, up = tl.split(tl.reshape(y, (1, 2)))
        tl.store(out_ptr + tl.program_id(0) + tl.arange(0, 1),
                 gated_value(gate, up, GELU_TANH).to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + offs_n, y, mask=n_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         gated: str | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias [N]) -> [1, N] in x's dtype; x contiguous, weight rows dense.
    gated "silu" / "gelu_tanh": weight is [gate | up] and the result act(gate) * up [1, N / 2]."""
    n, k = weight.shape
    if gated not in (None, "silu", "gelu_tanh") or (gated and n % 2):
        raise ValueError(f"gated must be None, 'silu' or 'gelu_tanh' over an even N, got {gated!r} with N {n}")
    out = torch.empty(1, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(n // 2 if gated else triton.cdiv(n, BLOCK_N),)](
        x, weight, bias if bias is not None else x, out, n, k, weight.stride(0), HAS_BIAS=bias is not None,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN_K=k % BLOCK_K == 0, GATED=gated is not None,
        GELU_TANH=gated == "gelu_tanh", num_warps=4, num_stages=1,
        **programmatic_launch_options(x))
    return out
