"""Fused elementwise kernels for the decoder block: RMSNorm (+ residual add), rotary embedding, gated MLP
activations. Each is one Triton launch on CUDA tensors and plain PyTorch elsewhere (the CPU, or no Triton).

The kernels round where the layer modules (norm.py, rotary.py, activation.py) round, so on the GPU a
model gives the same tokens with or without them: RMSNorm scales in float32 and casts before (Llama) or
after (Gemma, `offset=1`) the weight; rotary rounds each product like the unfused `x*cos + rot(x)*sin`.
They compile with `enable_fp_fusion=False`: otherwise the compiler contracts a rounded product and the
following add into one fused multiply-add (`fma.rn.bf16`), and the rounding the modules do is lost.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

triton = None
if torch.cuda.is_available():   # the CPU never launches these: importing Triton there costs ~66 MB of RSS
    try:
        import triton
        import triton.language as tl

        from ondo.layers.triton_math import (gated_value, norm_and_rotate_heads, programmatic_launch_options,
                                             rms_scaled, wait_for_previous_kernel)
    except ImportError:  # no Triton: the PyTorch paths below serve every call
        triton = None


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] as [rows, n] with a dense last dim (a view when the layout allows; x itself when it is one)."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                         stride_x, stride_residual, stride_out, stride_residual_out, n_cols, eps, offset,
                         HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
        wait_for_previous_kernel(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:   # the sum is rounded to the activation dtype, as `x + residual` is
            r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = rms_scaled(xf, rstd, w, offset, HAS_OFFSET, x.dtype)
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, positions_ptr,
                       stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cos,
                       NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                       HAS_POSITIONS: tl.constexpr, PDL: tl.constexpr):
        wait_for_previous_kernel(PDL)
        tok = tl.program_id(0).to(tl.int64)
        row = tok
        if HAS_POSITIONS:
            row = tl.load(positions_ptr + tok).to(tl.int64)
        offs_i = tl.arange(0, BLOCK_HALF)
        cos = tl.load(cos_ptr + row * stride_cos + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + row * stride_cos + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
        norm_and_rotate_heads(q_ptr, tok, stride_q_tok, stride_q_head, cos, sin, q_ptr, 0.0, 0.0,
                              NUM_Q_HEADS, HALF, BLOCK_HQ, BLOCK_HALF, False, False)
        norm_and_rotate_heads(k_ptr, tok, stride_k_tok, stride_k_head, cos, sin, k_ptr, 0.0, 0.0,
                              NUM_K_HEADS, HALF, BLOCK_HK, BLOCK_HALF, False, False)

    @triton.jit
    def _gated_act_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols,
                          GELU_TANH: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_for_previous_kernel(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
        out = gated_value(gate, up, GELU_TANH)
        tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             offset: float = 0.0):
    """RMSNorm over the last dim, as `ondo.layers.norm.RMSNorm`: x [..., hidden] -> normed [..., hidden];
    with `residual`, x = x + residual first and returns (normed, x). `offset=1.0` is Gemma's (1 + w)."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not _use_triton(x):
        return _rms_norm_torch(x, weight, eps, residual, offset)
    hidden = x.shape[-1]
    x2d = rows_of(x)                                                       # [rows, hidden]
    res2d = rows_of(residual) if residual is not None else x2d
    out = torch.empty(x2d.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    block = triton.next_power_of_2(hidden)
    if x2d.shape[0]:
        _rms_norm_kernel[(x2d.shape[0],)](
            x2d, res2d, weight, out, res_out, x2d.stride(0), res2d.stride(0), out.stride(0), res_out.stride(0),
            hidden, eps, offset, HAS_RESIDUAL=residual is not None, HAS_OFFSET=offset != 0.0, BLOCK=block,
            num_warps=min(max(block // 512, 1), 16), enable_fp_fusion=False, **programmatic_launch_options(x))
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), res_out.view(x.shape)


def _rms_norm_torch(x, weight, eps, residual, offset):
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = (normed * (offset + weight.float())).to(x.dtype) if offset else weight * normed.to(x.dtype)
    return out if residual is None else (out, x)


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                  positions: torch.Tensor | None = None) -> None:
    """Neox-style rotary embedding, in place on q [T, H*D] (or [T, H, D]) and k [T, KVH*D].

    cos/sin rows are [rot_dim] in the neox layout (the half frequencies repeated), as
    `RotaryEmbedding` returns them; row t is used for token t, or row positions[t] when a cos/sin
    cache indexed by position is given. rot_dim < head_dim rotates the first rot_dim dims (partial rotary).
    q and k may be strided views (slices of a fused QKV projection); each head's dims must be dense.
    """
    num_tokens, rot_dim = q.shape[0], cos.shape[-1]
    if rot_dim > head_dim or rot_dim % 2:
        raise ValueError(f"cos.shape[-1] (rot_dim) must be even and <= head_dim {head_dim}, got {rot_dim}")
    q3 = q.view(num_tokens, -1, head_dim)                                  # [T, H, D]
    k3 = k.view(num_tokens, -1, head_dim)                                  # [T, KVH, D]
    if not _use_triton(q):
        _apply_rotary_torch(q3, cos, sin, positions)
        _apply_rotary_torch(k3, cos, sin, positions)
        return
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("cos and sin must share one layout, dense in the last dim")
    half = rot_dim // 2
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            q3, k3, cos, sin, positions if positions is not None else cos,
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), cos.stride(0),
            NUM_Q_HEADS=q3.shape[1], NUM_K_HEADS=k3.shape[1], HALF=half,
            BLOCK_HQ=triton.next_power_of_2(q3.shape[1]), BLOCK_HK=triton.next_power_of_2(k3.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(half), HAS_POSITIONS=positions is not None, num_warps=4,
            enable_fp_fusion=False, **programmatic_launch_options(q))


def _apply_rotary_torch(x3, cos, sin, positions):
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    rot_dim, half = cos.shape[-1], cos.shape[-1] // 2
    cos, sin = cos[:, None, :], sin[:, None, :]                            # [T, 1, rot_dim]
    rot = x3[..., :rot_dim]
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    rot.copy_(rot * cos + rotated * sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2*I] = [gate | up] -> silu(gate) * up [T, I]."""
    return _gated(x, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2*I] = [gate | up] -> gelu_tanh(gate) * up [T, I] (Gemma's gelu_pytorch_tanh)."""
    return _gated(x, gelu_tanh=True)


def _gated(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"the last dim of x must be even ([gate | up]), got {x.shape[-1]}")
    if not _use_triton(x):
        gate, up = x.chunk(2, dim=-1)
        return (F.gelu(gate, approximate="tanh") if gelu_tanh else F.silu(gate)) * up
    inter = x.shape[-1] // 2
    x2d = rows_of(x)                                                       # [T, 2*I]
    out = torch.empty((x2d.shape[0], inter), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(inter), 1024)
    if x2d.shape[0]:
        _gated_act_kernel[(x2d.shape[0], triton.cdiv(inter, block))](
            x2d, out, x2d.stride(0), out.stride(0), inter, GELU_TANH=gelu_tanh, BLOCK=block, num_warps=4,
            enable_fp_fusion=False, **programmatic_launch_options(x))
    return out.view(*x.shape[:-1], inter)
