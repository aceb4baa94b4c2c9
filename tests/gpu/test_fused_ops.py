"""The fused Triton kernels against the layer modules they replace (norm.py, rotary.py, activation.py).

The kernels round where the modules round, so most elements match bit for bit; the checks allow two
rounding steps of the activation dtype. Inputs are random; before each call the allocator's cache is
filled with NaN, so an output element the kernel never writes shows up as NaN (rotary runs in place).
With TRITON_INTERPRET=1 the kernels also run (slowly) on the CPU, float16 only.
"""
from __future__ import annotations

import os

import pytest
import torch

from ondo.layers import cpu_kernels, fused
from ondo.layers.activation import GatedActivation
from ondo.layers.norm import RMSNorm
from ondo.layers.rotary import apply_rotary

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNNABLE = fused.triton is not None and (torch.cuda.is_available() or INTERPRET)
needs_kernels = pytest.mark.skipif(not RUNNABLE, reason="needs CUDA and Triton (or TRITON_INTERPRET=1)")
DTYPES = ["float16"] if INTERPRET and not torch.cuda.is_available() else ["bfloat16", "float16"]


@pytest.fixture(autouse=True)
def kernels_on_cpu_when_interpreting(monkeypatch):
    if INTERPRET and not torch.cuda.is_available():
        monkeypatch.setattr(fused, "_use_triton", lambda x: True)


def poison_allocator(like: torch.Tensor) -> None:
    """Leave a NaN-filled block in the CUDA caching allocator, where the op's next torch.empty lands."""
    torch.full((4 * like.numel(),), float("nan"), dtype=like.dtype, device=like.device)


def assert_close_to_module(got: torch.Tensor, want: torch.Tensor, min_exact: float, atol: float = 1e-5):
    """Within two rounding steps everywhere (an intermediate rounding that flips can add one), bit-identical
    on at least `min_exact` of the elements."""
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2 * torch.finfo(got.dtype).eps, atol=atol)
    exact = (got == want).float().mean().item()
    assert exact >= min_exact, f"only {exact:.3f} of the elements are bit-identical to the module"


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("rows,hidden,offset,with_residual", [
    (7, 64, 0.0, False), (33, 896, 0.0, True), (5, 2304, 1.0, True), (300, 4096, 0.0, True), (3, 1000, 1.0, False),
])
def test_rms_norm_matches_module(dtype_name, rows, hidden, offset, with_residual):
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(rows * hidden)
    module = RMSNorm(hidden, eps=1e-6, offset=offset)
    module.weight.data = torch.randn(hidden, generator=gen) * 0.5 + (0.0 if offset else 1.0)
    module = module.to(DEVICE, dtype)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(DEVICE, dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype) if with_residual else None
    poison_allocator(x)
    got = fused.rms_norm(x, module.weight, 1e-6, residual, offset=offset)
    want = module(x, residual) if with_residual else module(x)
    if with_residual:
        assert torch.equal(got[1], want[1]), "the new residual is x + residual, rounded once"
        got, want = got[0], want[0]
    assert_close_to_module(got, want, min_exact=0.95)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,rot_dim,by_position", [
    (5, 4, 2, 64, 64, False), (37, 32, 8, 128, 128, True), (9, 8, 4, 256, 256, False), (11, 6, 2, 80, 40, True),
])
def test_rotary_in_place_matches_module(dtype_name, tokens, heads, kv_heads, head_dim, rot_dim, by_position):
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(tokens * heads)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(DEVICE, dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)   # strided views
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(DEVICE)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    table = torch.arange(4096).float()[:, None] * inv_freq[None, :]                 # [max_pos, rot_dim / 2]
    table = torch.cat((table, table), -1).to(DEVICE)                                # neox layout
    cos_cache, sin_cache = table.cos().to(dtype), table.sin().to(dtype)
    cos, sin = cos_cache[positions], sin_cache[positions]                           # [T, rot_dim]
    want_q, want_k = apply_rotary(q, cos, sin, head_dim), apply_rotary(k, cos, sin, head_dim)
    untouched = qkv[:, (heads + kv_heads) * head_dim:].clone()
    if by_position:
        fused.apply_rotary_(q, k, cos_cache, sin_cache, head_dim, positions=positions)
    else:
        fused.apply_rotary_(q, k, cos, sin, head_dim)
    assert_close_to_module(q, want_q, min_exact=0.999)
    assert_close_to_module(k, want_k, min_exact=0.999)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], untouched), "v must not be touched"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (16, 8, 128), (4, 1, 256), (6, 2, 64)])
@pytest.mark.parametrize("norm_offset", [None, 0.0, 1.0])     # Llama, Qwen3 head norms, Gemma 3 (1 + w)
def test_rotate_and_write_equals_norm_rotary_and_write_kernels(dtype_name, heads, kv_heads, head_dim, norm_offset):
    """The attention layer's one-launch path against the three kernels it replaces: per-head norms
    (fused.rms_norm), rotation (fused.apply_rotary_) and the cache write (write_kv_cache)."""
    from ondo.layers.attention.triton_cache import rotate_and_write_kv, write_kv_cache

    dtype = getattr(torch, dtype_name)
    tokens, page = 37, 16
    gen = torch.Generator().manual_seed(heads * head_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(DEVICE, dtype)
    q, k, v = (t.view(tokens, -1, head_dim) for t in
               qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1))
    angles = torch.rand(tokens, head_dim // 2, generator=gen) * 100
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    slots = torch.randperm(4 * page, generator=gen)[:tokens].to(DEVICE)
    slots[3] = -1                                                                  # a padded token
    norms = None
    if norm_offset is not None:
        norms = tuple(RMSNorm(head_dim, 1e-6, offset=norm_offset).to(DEVICE, dtype) for _ in range(2))
        for n in norms:
            n.weight.data.copy_(torch.randn(head_dim, generator=gen) * 0.5)
    want_q, want_k = q.clone(), k.clone()
    if norms is not None:
        want_q, want_k = (fused.rms_norm(x, n.weight, n.eps, offset=n.offset) for x, n in zip((want_q, want_k), norms))
    fused.apply_rotary_(want_q, want_k, cos, sin, head_dim)
    want_cache = torch.zeros(2, 4, page, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    write_kv_cache(want_cache, want_k, v, slots)
    got_cache = torch.zeros_like(want_cache)
    rotate_and_write_kv(q, k, v, cos, sin, got_cache, slots, norms)
    # Each head's sum of squares is added in another order than fused.rms_norm adds it: a normed value
    # may differ by one step, and where the rotation's two products cancel that step is large against
    # the result. So the bound is one step of the largest value, and nearly every element is exact.
    atol = 2 * torch.finfo(dtype).eps * want_q.abs().max().item() if norms is not None else 1e-5
    assert_close_to_module(q, want_q, min_exact=0.999, atol=atol)
    assert_close_to_module(got_cache, want_cache, min_exact=0.999, atol=atol)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("tokens,inter", [(1, 64), (13, 1000), (64, 3072)])
def test_gated_activation_matches_module(dtype_name, act, tokens, inter):
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(tokens + inter)
    x = (torch.randn(tokens, 2 * inter, generator=gen) * 4).to(DEVICE, dtype)
    op = fused.silu_and_mul if act == "silu" else fused.gelu_tanh_and_mul
    poison_allocator(x)
    assert_close_to_module(op(x), GatedActivation(act)(x), min_exact=0.9)


def test_cpu_fallbacks_match_modules(monkeypatch):
    """Without CUDA the same functions run in PyTorch and agree exactly with the modules' torch code (their
    C kernels are compared with that code in tests/layers/test_cpu_kernels.py, to the last unit)."""
    monkeypatch.setattr(fused, "_use_triton", lambda x: False)
    monkeypatch.setattr(cpu_kernels, "_enabled", False)
    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(4, 32, generator=gen), torch.randn(4, 32, generator=gen)
    norm = RMSNorm(32, eps=1e-5)
    torch.testing.assert_close(fused.rms_norm(x, norm.weight, 1e-5, residual), norm(x, residual), rtol=0, atol=0)
    q, k = torch.randn(3, 2 * 16, generator=gen), torch.randn(3, 16, generator=gen)
    cos, sin = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    want_q, want_k = apply_rotary(q, cos, sin, 16), apply_rotary(k, cos, sin, 16)
    fused.apply_rotary_(q, k, cos, sin, 16)
    torch.testing.assert_close((q, k), (want_q, want_k), rtol=0, atol=0)
    gate_up = torch.randn(3, 20, generator=gen)
    torch.testing.assert_close(fused.silu_and_mul(gate_up), GatedActivation("silu")(gate_up), rtol=0, atol=0)


def test_bad_shapes_name_the_field():
    with pytest.raises(ValueError, match="last dim of x must be even"):
        fused.silu_and_mul(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="rot_dim"):
        fused.apply_rotary_(torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(2, 10), torch.zeros(2, 10), 8)
    with pytest.raises(ValueError, match="residual must have"):
        fused.rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-6, torch.zeros(2, 4))
