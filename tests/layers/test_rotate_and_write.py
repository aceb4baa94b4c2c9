"""The attention layer's one-launch GPU path (`triton_cache.rotate_and_write_kv`): per-head RMSNorm,
rotary embedding and the cache write in one kernel, against the modules and the portable backend's
write, run by Triton's interpreter on the CPU (tests/gpu/test_fused_ops.py runs it on a GPU)."""
from __future__ import annotations

from tests.triton_interpreter import assert_passes_in_triton_interpreter

_INTERPRETED = r"""
import torch
from ondo.layers import fused
from ondo.layers.attention.torch_backend import write_kv
from ondo.layers.attention.triton_cache import rotate_and_write_kv
from ondo.layers.norm import RMSNorm
torch.manual_seed(0)

def case(dtype, heads, kv_heads, head_dim, norm_offset):
    tokens, blocks, page = 5, 4, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)     # q, k, v: strided views
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    q3, k3, v3 = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    angles = torch.rand(tokens, head_dim // 2) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=1).to(dtype) for f in (torch.cos, torch.sin))   # neox layout
    slots = torch.tensor([3, -1, 7, 0, 12])                                     # -1: a padded token
    norms = None
    if norm_offset is not None:
        norms = tuple(RMSNorm(head_dim, 1e-6, offset=norm_offset).to(dtype) for _ in range(2))
        for n in norms:
            n.weight.data.normal_(0, 0.5)
    # the modules' path: norm each head, rotate in place, write (the portable backend's write)
    want_q, want_k = q3.clone(), k3.clone()
    if norms is not None:
        want_q, want_k = norms[0](want_q), norms[1](want_k)
    fused._apply_rotary_torch(want_q, cos, sin, None)
    fused._apply_rotary_torch(want_k, cos, sin, None)
    want_cache = torch.zeros(2, blocks, page, kv_heads, head_dim, dtype=dtype)
    live = slots >= 0
    write_kv(want_cache, want_k[live], v3[live], slots[live])
    got_cache = torch.zeros_like(want_cache)
    rotate_and_write_kv(q3, k3, v3, cos, sin, got_cache, slots, norms)
    tol = dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-5)     # a norm's sum in another order: one step
    torch.testing.assert_close(q3, want_q, **tol)
    torch.testing.assert_close(k3, want_k, **tol)
    torch.testing.assert_close(got_cache, want_cache, **tol)
    assert torch.equal(got_cache[1], want_cache[1])            # values are copied untouched
    if dtype == torch.float16:   # the roundings sit where the modules' sit: nearly all bit for bit (a norm's
        # sum in another order can flip one rounding; in float32 every such difference shows)
        for got, want in ((q3, want_q), (got_cache, want_cache)):
            assert (got == want).float().mean().item() >= 0.99

# float16 and float32: the interpreter rounds those to nearest (it truncates to bfloat16)
for dtype in (torch.float16, torch.float32):
    for heads, kv_heads, head_dim in [(4, 2, 16), (3, 3, 64), (8, 1, 128)]:
        for norm_offset in (None, 0.0, 1.0):                  # Llama, Qwen3 (head norms), Gemma 3 (1 + w)
            case(dtype, heads, kv_heads, head_dim, norm_offset)
try:
    rotate_and_write_kv(*(torch.zeros(1, 2, 8) for _ in range(3)), torch.zeros(1, 4), torch.zeros(1, 4),
                        torch.zeros(2, 1, 4, 2, 8), torch.zeros(1, dtype=torch.long))
    raise SystemExit("partial rotary was accepted")
except ValueError as e:
    assert "rotates whole heads" in str(e), e
print("ok")
"""


def test_rotate_and_write_in_the_triton_interpreter():
    assert_passes_in_triton_interpreter(_INTERPRETED)
