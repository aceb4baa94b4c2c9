"""Triton device functions shared by several kernels (imported only where Triton runs)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def programmatic_launch_options(t: torch.Tensor) -> dict:
    """The launch keywords of a kernel working on t that calls `wait_for_previous_kernel(PDL)`: PDL and
    launch_pdl together, on where programmatic dependent launch exists (sm_90 and newer).

    A decode step is some ten small kernels a layer inside a CUDA graph, and each used to start only
    once the one before it had finished: the gap between them is part of every token. With PDL a kernel
    is launched while its predecessor runs, its programs become resident, and `wait_for_previous_kernel`
    holds them until the predecessor's writes are visible. A kernel launched so must call that wait
    before it touches memory the previous kernels write (or read), so that completion stays ordered
    along the stream; passing both keywords from here keeps the launch and the wait together.
    ONDO_PDL=0 (read at the first launch on a device) turns it off."""
    if not t.is_cuda:   # Triton's interpreter on the CPU
        return _PDL_OFF
    return _cuda_options(t.device.index if t.device.index is not None else torch.cuda.current_device())


_PDL_OFF = {"PDL": False, "launch_pdl": False}


@functools.cache
def _cuda_options(device_index: int) -> dict:
    on = torch.cuda.get_device_capability(device_index)[0] >= 9 and os.environ.get("ONDO_PDL", "1") != "0"
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL (`programmatic_launch_options`): wait until the previous kernel in the stream has finished
    and its writes are visible, then let the next kernel launch. No-op otherwise."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def field_as_float(words, BIT: tl.constexpr, WIDTH: tl.constexpr):
    """The unsigned WIDTH-bit field at bit BIT of each int32 word, as the float32 value * 2^(BIT - 149)
    where the field lies below bit 24, else value * 2^-149.

    The bits of a number below 2^24 read as a float32 are that number times 2^-149 (a subnormal, or
    exponent 1; Triton's FMAs keep subnormal inputs), so one mask makes a low field a float, where a float
    built from the value needs a shift and a mask-or, and a subtraction, besides. A field reaching bit 24
    shifts down first. The quantized GEMVs multiply it by `meet_field(x, BIT, WIDTH)`."""
    if BIT + WIDTH <= 24:
        bits = words & (((1 << WIDTH) - 1) << BIT)
    elif BIT + WIDTH == 32:
        bits = (words.to(tl.uint32, bitcast=True) >> BIT).to(tl.int32, bitcast=True)
    else:
        bits = (words >> BIT) & ((1 << WIDTH) - 1)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def meet_field(x, BIT: tl.constexpr, WIDTH: tl.constexpr):
    """x * 2^(76 - BIT') for a field at BIT (a multiple of 4; BIT' = BIT below bit 24, else 0): times
    `field_as_float(words, BIT, WIDTH)` it is value * x * 2^-73, a normal float32 wherever |value * x|
    exceeds 2^-53, and finite for |x| below 2^51. (Literal factors: BIT may reach here traced.)"""
    if BIT + WIDTH > 24:
        y = x * 7.555786372591432e+22          # 2^76
    elif BIT == 4:
        y = x * 4.722366482869645e+21          # 2^72
    elif BIT == 8:
        y = x * 2.9514790517935283e+20         # 2^68
    elif BIT == 12:
        y = x * 1.8446744073709552e+19         # 2^64
    elif BIT == 16:
        y = x * 1.152921504606847e+18          # 2^60
    elif BIT == 20:
        y = x * 7.205759403792794e+16          # 2^56
    else:
        y = x * 7.555786372591432e+22          # 2^76
    return y


@triton.jit
def unscale_field_products(total):
    """Times 2^73 (exact): turns a sum of `field_as_float(...) * meet_field(...)` products, value * x * 2^-73
    each, back into the sum of value * x; applied to the sum, or to a factor that multiplies it."""
    return total * 9444732965739290427392.0       # 2^73


@triton.jit
def gated_value(gate, up, GELU_TANH: tl.constexpr):
    """act(gate) * up in float32, for gate / up already rounded to the activation dtype: the activation is
    computed in float32 and rounded to that dtype before the product, as the unfused modules round."""
    g = gate.to(tl.float32)
    if GELU_TANH:      # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh through exp2
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = g - g / (tl.exp2(inner * (2.0 * 1.4426950408889634)) + 1.0)
    else:              # silu: g * sigmoid(g)
        act = g / (1.0 + tl.exp2(-g * 1.4426950408889634))
    return act.to(gate.dtype).to(tl.float32) * up.to(tl.float32)


@triton.jit
def rms_scaled(xf, rstd, w, offset, HAS_OFFSET: tl.constexpr, dtype: tl.constexpr):
    """x / rms(x) * (offset + w) in float32 (xf, w float32), rounded where RMSNorm rounds; the caller
    rounds the result to `dtype`. Gemma (HAS_OFFSET) multiplies by (offset + w) in float32 at once;
    Llama rounds the normalised value to `dtype` first, then multiplies by the weight."""
    if HAS_OFFSET:
        return xf * rstd * (offset + w)
    return (xf * rstd).to(dtype).to(tl.float32) * w


@triton.jit
def norm_and_rotate_heads(x_ptr, tok, stride_tok, stride_head, cos, sin, w_ptr, eps, offset,
                          NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """The heads [NUM_HEADS, 2 * HALF] of token `tok` (neox layout, cos / sin float32 [1, BLOCK_HALF]),
    RMS-normed over each head first when HAS_NORM (weight w_ptr [2 * HALF]), rotated in place; returns
    the two rotated halves [BLOCK_H, BLOCK_HALF] in x's dtype."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_i < HALF)[None, :]
    first = x_ptr + tok * stride_tok + offs_h[:, None] * stride_head + offs_i[None, :]   # [BLOCK_H, BLOCK_HALF]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1f * x1f, 1) + tl.sum(x2f * x2f, 1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
        x1f = rms_scaled(x1f, rstd, w1, offset, HAS_OFFSET, dtype).to(dtype).to(tl.float32)
        x2f = rms_scaled(x2f, rstd, w2, offset, HAS_OFFSET, dtype).to(dtype).to(tl.float32)
    # x * cos + rotate_half(x) * sin, each product rounded like the unfused bf16/fp16 ops
    a1 = (x1f * cos).to(dtype).to(tl.float32)
    b1 = (x2f * sin).to(dtype).to(tl.float32)
    a2 = (x2f * cos).to(dtype).to(tl.float32)
    b2 = (x1f * sin).to(dtype).to(tl.float32)
    r1, r2 = (a1 - b1).to(dtype), (a2 + b2).to(dtype)
    tl.store(first, r1, mask=mask)
    tl.store(first + HALF, r2, mask=mask)
    return r1, r2
