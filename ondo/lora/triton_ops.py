"""Batched multi-LoRA on the GPU (punica / S-LoRA style): out[t] += B[s] (A[s] x[t]), s = slot of token t.

Two kernels, each reading the token's slot from a device buffer so they replay inside CUDA graphs:
shrink (x·Aᵀ into a float32 [T, S*R] scratch, split over K with atomic adds so a few decode tokens
still fill the GPU) and expand (scratch·Bᵀ added in place into the layer's output, one program per
token and block of output columns). A slot of -1 makes both programs return at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_SPLIT_K = 512
_BLOCK_K = 64
_BLOCK_N = 128


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, tmp_ptr, K, R, stride_xt, stride_al, stride_ar,
                   SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    k_start = tl.program_id(1) * SPLIT_K
    for k0 in range(k_start, k_start + SPLIT_K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + t * stride_xt + k, mask=k < K, other=0.0).to(tl.float32)             # [BLOCK_K]
        a = tl.load(a_ptr + slot.to(tl.int64) * stride_al + r[:, None] * stride_ar + k[None, :],
                    mask=(r[:, None] < R) & (k[None, :] < K), other=0.0).to(tl.float32)          # [BLOCK_R, BLOCK_K]
        acc += tl.sum(a * xk[None, :], axis=1)
    tl.atomic_add(tmp_ptr + t * BLOCK_R + r, acc, mask=r < R)


@triton.jit
def _expand_kernel(tmp_ptr, b_ptr, slots_ptr, out_ptr, N, R, stride_ot, stride_bl, stride_bn,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    h = tl.load(tmp_ptr + t * BLOCK_R + r)                                                        # [BLOCK_R]
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bl + n[:, None] * stride_bn + r[None, :],
                mask=(n[:, None] < N) & (r[None, :] < R), other=0.0).to(tl.float32)              # [BLOCK_N, BLOCK_R]
    delta = tl.sum(b * h[None, :], axis=1)                                                        # [BLOCK_N]
    o = tl.load(out_ptr + t * stride_ot + n, mask=n < N)
    tl.store(out_ptr + t * stride_ot + n, (o.to(tl.float32) + delta).to(o.dtype), mask=n < N)


def add_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
    """x [T, K], lora_a [L, R, K], lora_b [L, N, R], token_slots [T] int32 (-1 = none), out [T, N] (in place)."""
    num_tokens, k = x.shape
    n, r = lora_b.shape[1], lora_a.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    assert out.stride(1) == 1 and lora_a.stride(2) == 1 and lora_b.stride(2) == 1
    block_r = max(16, triton.next_power_of_2(r))
    tmp = torch.zeros(num_tokens, block_r, dtype=torch.float32, device=x.device)                 # [T, BLOCK_R]
    _shrink_kernel[(num_tokens, triton.cdiv(k, _SPLIT_K))](
        x, lora_a, token_slots, tmp, k, r, x.stride(0), lora_a.stride(0), lora_a.stride(1),
        SPLIT_K=_SPLIT_K, BLOCK_K=_BLOCK_K, BLOCK_R=block_r)
    _expand_kernel[(num_tokens, triton.cdiv(n, _BLOCK_N))](
        tmp, lora_b, token_slots, out, n, r, out.stride(0), lora_b.stride(0), lora_b.stride(1),
        BLOCK_N=_BLOCK_N, BLOCK_R=block_r)
    return out
