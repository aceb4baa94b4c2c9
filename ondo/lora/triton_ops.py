"""Batched multi-LoRA on the GPU, grouped by adapter (punica's SGMV shape): out[t] += B[s] (A[s] x[t]).

The step's tokens come grouped by slot (`TokenGroups`: for each group its slot, where its run of the
token indices sorted by slot starts and how long it is), all in one device buffer, so the kernels
replay inside CUDA graphs. A program owns one group and walks its tokens in tiles of BLOCK_M rows, so
each adapter's A and B tiles are read once per step however many tokens use them, and the products run
on the tensor cores. The grid has min(max_loras, T) groups (one decode token needs one), an unused
group returns at once, and tokens of no slot (the base model) are never touched. Long eager steps
(prefill) also split each group's tiles over several programs.

- shrink: x·Aᵀ over one split of K per program: many short programs keep a single decode token's
  loads in flight. Written as float32 partials [splits, T, BLOCK_W], so no buffer needs zeroing on
  the critical path; or (`summed`, off the critical path on a side stream) added atomically into one
  zeroed row per token, so the expand reads one row instead of one per split.
- expand: sums a token's partials, multiplies by a tile of B's rows and adds into the layer's output
  in place (or writes the delta alone).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ondo.lora.layers import span_rows

# Tiling, module-level so benchmarks can sweep it (a kernel recompiles for each value).
SPLIT_K = 512
BLOCK_N = 128
BLOCK_K = 64


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, groups_ptr, max_groups, part_ptr, K, W,
                   stride_xt, stride_al, stride_aw, stride_part,
                   SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                   PRECISION: tl.constexpr, ATOMIC: tl.constexpr):
    split, group = tl.program_id(0), tl.program_id(1)
    slot = tl.load(groups_ptr + group)                    # three independent loads, issued together
    start = tl.load(groups_ptr + max_groups + group)
    count = tl.load(groups_ptr + 2 * max_groups + group)
    if count == 0:
        return
    tokens_ptr = groups_ptr + 3 * max_groups + start
    w = tl.arange(0, BLOCK_W)
    a_base = a_ptr + slot.to(tl.int64) * stride_al
    k_begin = split * SPLIT_K
    for m0 in range(tl.program_id(2) * BLOCK_M, count, tl.num_programs(2) * BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        row_ok = m < count
        rows = tl.load(tokens_ptr + m, mask=row_ok, other=0).to(tl.int64)                         # [BLOCK_M]
        acc = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
        for k0 in range(k_begin, k_begin + SPLIT_K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xt + k[None, :],
                        mask=row_ok[:, None] & (k[None, :] < K), other=0.0)                     # [BLOCK_M, BLOCK_K]
            a = tl.load(a_base + w[None, :] * stride_aw + k[:, None],
                        mask=(w[None, :] < W) & (k[:, None] < K), other=0.0)                    # [BLOCK_K, BLOCK_W]
            acc += tl.dot(x, a, input_precision=PRECISION)
        if ATOMIC:   # every split adds into one zeroed row per token
            tl.atomic_add(part_ptr + rows[:, None] * BLOCK_W + w[None, :], acc, mask=row_ok[:, None])
        else:
            tl.store(part_ptr + split * stride_part + rows[:, None] * BLOCK_W + w[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _expand_kernel(part_ptr, b_ptr, groups_ptr, max_groups, out_ptr, N, W,
                   stride_part, stride_ot, stride_bl, stride_bn, SPLITS: tl.constexpr, ACCUMULATE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr):
    n_tile, group = tl.program_id(0), tl.program_id(1)
    slot = tl.load(groups_ptr + group)
    start = tl.load(groups_ptr + max_groups + group)
    count = tl.load(groups_ptr + 2 * max_groups + group)
    if count == 0:
        return
    tokens_ptr = groups_ptr + 3 * max_groups + start
    n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    w = tl.arange(0, BLOCK_W)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bl + n[None, :] * stride_bn + w[:, None],
                mask=(w[:, None] < W) & (n[None, :] < N), other=0.0)                            # [BLOCK_W, BLOCK_N]
    for m0 in range(tl.program_id(2) * BLOCK_M, count, tl.num_programs(2) * BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        row_ok = m < count
        rows = tl.load(tokens_ptr + m, mask=row_ok, other=0).to(tl.int64)                         # [BLOCK_M]
        mask = row_ok[:, None] & (n[None, :] < N)
        out_ptrs = out_ptr + rows[:, None] * stride_ot + n[None, :]
        if ACCUMULATE:
            o = tl.load(out_ptrs, mask=mask).to(tl.float32)                                     # [BLOCK_M, BLOCK_N]
        h = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
        for s in tl.static_range(SPLITS):   # unrolled: the partials' loads are all in flight at once
            h += tl.load(part_ptr + s * stride_part + rows[:, None] * BLOCK_W + w[None, :],
                         mask=row_ok[:, None], other=0.0)                                       # [BLOCK_M, BLOCK_W]
        delta = tl.dot(h.to(b.dtype), b, input_precision=PRECISION)                             # [BLOCK_M, BLOCK_N]
        if ACCUMULATE:
            delta += o
        tl.store(out_ptrs, delta.to(out_ptr.dtype.element_ty), mask=mask)


class TokenGroups:
    """The step's tokens grouped by adapter slot, in one int32 device buffer [slot (G) | start (G) |
    count (G) | token indices sorted by group], G = max_loras: a static buffer, so captured graphs read
    each step's grouping. Unused groups count 0."""

    def __init__(self, max_loras: int, max_tokens: int, device: torch.device):
        self.max_groups = max_loras
        self.buffer = torch.zeros(3 * max_loras + max_tokens, dtype=torch.int32, device=device)

    def write(self, spans: dict[int, list[tuple[int, int]]]) -> None:
        """Each slot's token rows ([start, end) spans of the step's tokens) in one copy. Graph padding
        rows are in no slot, so they run the base model."""
        header = np.zeros((3, self.max_groups), dtype=np.int32)   # slot, start, count
        tokens, offset = [], 0
        for group, (slot, slot_spans) in enumerate(spans.items()):
            rows = span_rows(slot_spans)
            header[:, group] = slot, offset, len(rows)
            offset += len(rows)
            tokens.append(rows)
        host = torch.from_numpy(np.concatenate([header.ravel(), *tokens]))
        if self.buffer.is_cuda:
            host = host.pin_memory()
        self.buffer[:len(host)].copy_(host, non_blocking=True)


def add_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, groups: TokenGroups,
             out: torch.Tensor) -> torch.Tensor:
    """x [T, K], lora_a [L, W, K], lora_b [L, N, W], out [T, N] (added to in place); `groups` names the
    tokens of each slot (rows of x)."""
    return lora_expand(lora_shrink(x, lora_a, groups), lora_b, groups, out)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, groups: TokenGroups, split_k: int | None = None,
                block_k: int | None = None, summed: bool = False) -> torch.Tensor:
    """x [T, K] · A[slot]ᵀ as float32 partial sums [splits, T, BLOCK_W] (rows of tokens in no slot
    unset), K cut in splits of `split_k` (default SPLIT_K) read `block_k` (default BLOCK_K) at a time.
    `summed`: the splits are added atomically into one zeroed [1, T, BLOCK_W] (a memset more, but the
    expand then reads one row per token instead of one per split)."""
    split_k, block_k = split_k or SPLIT_K, block_k or BLOCK_K
    assert split_k % block_k == 0
    num_tokens, k = x.shape
    width = lora_a.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    assert lora_a.stride(2) == 1
    block_w = _block_w(width)
    splits = triton.cdiv(k, split_k)
    if summed:
        partials = torch.zeros(1, num_tokens, block_w, dtype=torch.float32, device=x.device)
    else:
        partials = torch.empty(splits, num_tokens, block_w, dtype=torch.float32, device=x.device)
    _shrink_kernel[_grid(splits, groups, num_tokens)](
        x, lora_a, groups.buffer, groups.max_groups, partials, k, width,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), partials.stride(0),
        SPLIT_K=split_k, BLOCK_M=_block_m(num_tokens), BLOCK_K=block_k, BLOCK_W=block_w,
        PRECISION=_precision(x.dtype), ATOMIC=summed)
    return partials


def lora_expand(partials: torch.Tensor, lora_b: torch.Tensor, groups: TokenGroups, out: torch.Tensor,
                accumulate: bool = True) -> torch.Tensor:
    """out[t] += (sum of t's partials) · B[slot]ᵀ (or = without `accumulate`), for the tokens of every
    slot; returns `out`."""
    splits, num_tokens, block_w = partials.shape
    n, width = lora_b.shape[1], lora_b.shape[2]
    assert out.stride(1) == 1 and lora_b.stride(2) == 1 and block_w == _block_w(width)
    _expand_kernel[_grid(triton.cdiv(n, BLOCK_N), groups, num_tokens)](
        partials, lora_b, groups.buffer, groups.max_groups, out, n, width,
        partials.stride(0), out.stride(0), lora_b.stride(0), lora_b.stride(1), SPLITS=splits, ACCUMULATE=accumulate,
        BLOCK_M=_block_m(num_tokens), BLOCK_N=BLOCK_N, BLOCK_W=block_w, PRECISION=_precision(out.dtype))
    return out


def _grid(tiles: int, groups: TokenGroups, num_tokens: int) -> tuple[int, int, int]:
    """(tiles, groups, programs per group): T tokens fill at most T groups, and a long eager step
    (prefill) spreads each group's row tiles over several programs."""
    block_m = _block_m(num_tokens)
    return tiles, min(groups.max_groups, num_tokens), max(1, num_tokens // (8 * block_m))


def _block_w(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


def _block_m(num_tokens: int) -> int:
    return 16 if num_tokens <= 64 else 32 if num_tokens <= 512 else 64


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"   # only float32 inputs look at it
