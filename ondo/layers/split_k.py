"""Split-K for the Triton matrix kernels without an atomic float output: the last program of a tile adds.

A decode-sized product has too few output tiles to keep every SM streaming weights, so the kernels
split K across programs. Adding float32 partial sums into a zeroed output with atomics costs two more
launches per product (the zero fill and the cast to the activation dtype: on an H200 each is a ~1 us
kernel plus its gap inside the CUDA graph, ~0.4 ms a Llama-3-8B int4 token) and the sum's order
changes from run to run. Here each program stores its partial sums in a workspace and counts itself
in the tile's lock; the last to arrive adds the partials in split order (deterministic), writes the
output in its own dtype and resets the lock, so the locks stay zero between launches and a CUDA
graph replays them without a fill. (The same release/acquire handshake as CUTLASS's serial split-K.)

Imported only where Triton runs (a GPU, or Triton's interpreter in the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILES = 1 << 16            # locks per device (the kernels split K only for a few thousand tiles)
_LOCKS: dict[tuple[str, int | None], torch.Tensor] = {}


def locks(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's zeroed int32 locks (one per output tile of a launch), allocated once and never replaced:
    CUDA graphs keep their address."""
    if tiles > MAX_TILES:
        raise ValueError(f"a split-K launch has at most {MAX_TILES} output tiles, got {tiles}")
    key = (device.type, device.index)
    if key not in _LOCKS:
        _LOCKS[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _LOCKS[key]


def buffers(splits: int, size: int, tiles: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace, locks) of a launch with `tiles` output tiles: room for every split's float32 partial
    sums of `size` outputs (uninitialised: each is written first; `out` stands in when K is not split,
    as nothing is written there), and the device's locks."""
    workspace = torch.empty(splits, size, dtype=torch.float32, device=out.device) if splits > 1 else out
    return workspace, locks(out.device, tiles)


@triton.jit
def store_split_k(acc, out_ptrs, mask, ws_ptr, offs, lock_ptr, split, SPLITS: tl.constexpr, WS_STRIDE):
    """Stores a product's float32 `acc` at `out_ptrs`, in their dtype. K not split: at once. Split: this
    program stores its partial sums at workspace row `split`, offsets `offs`, and counts itself in the
    tile's lock; the last of the SPLITS programs adds every row in split order, stores the total and
    resets the lock."""
    if SPLITS > 1:
        tl.store(ws_ptr + split * WS_STRIDE + offs, acc, mask=mask)
        tl.debug_barrier()                          # every thread's partial is stored before the count
        arrived = tl.atomic_add(lock_ptr, 1)        # acq_rel at GPU scope: publishes the partials, sees the others'
        if arrived == SPLITS - 1:
            total = tl.zeros_like(acc)
            for s in tl.static_range(SPLITS):
                total += tl.load(ws_ptr + s * WS_STRIDE + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr, 0)             # zero again for the next launch
    else:
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)
