"""The per-layer LoRA slot pool and the delta it adds, per token, to a `Linear`'s output.

Each wrapped `Linear` holds `max_loras` slots of stacked weights: A [max_loras, S*R, in] and
B [max_loras, out, S*R], with S the layer's shards (3 for q/k/v, 2 for gate/up, else 1) and R the
max_lora_rank. Shard s of an adapter uses columns [s*R, s*R + r) of A's rows and B's columns, and B
is zero outside that shard's rows, so a LoRA on q_proj changes q's rows only while the merged
layer still runs as two matrix products. Ranks below R are zero-padded; the scaling is folded into B.

Which slot each token uses is the step state's `token_slots` (-1 = base model), a static device
buffer so a CUDA graph reads it by slicing. Two ways to add the delta:
- grouped (CPU, and GPU prefill): one x·Aᵀ·Bᵀ per adapter present in the step, over its rows. The
  alternative, gathering each token's A and B and running a batched matmul, copies T adapters'
  weights per layer (a 2048-token prefill would move 2048 × 16 × 4096 values for one A); grouping
  reads each adapter once and runs as ordinary GEMMs.
- per-token Triton kernels (GPU decode, inside CUDA graphs): shrink then expand, each program
  reading its token's slot from the buffer, so no host metadata changes the graph.
"""
from __future__ import annotations

import torch
from torch import nn

from ondo.layers.linear import Linear
from ondo.lora.adapter import ModuleDelta

TRITON_MAX_TOKENS = 64   # eager GPU steps with more tokens use the grouped GEMMs (tensor cores)


class LoRAStepState:
    """What every LoRA layer reads during a forward, written once per step by the manager."""

    def __init__(self, max_tokens: int, device: torch.device):
        self.token_slots = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)   # [max_tokens]
        self.groups: list[tuple[int, slice | torch.Tensor]] = []   # (slot, rows of x) for the grouped path
        self.use_triton = device.type == "cuda" and _triton_available()


class LoRALinear(nn.Module):
    def __init__(self, layer: Linear, state: LoRAStepState, max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.state, self.max_rank = state, max_rank
        self.out_sizes, self.offsets = list(layer.out_sizes), list(layer.offsets)
        width = len(self.out_sizes) * max_rank
        self.lora_a = torch.zeros(max_loras, width, layer.in_features, dtype=dtype, device=device)   # [L, S*R, in]
        self.lora_b = torch.zeros(max_loras, layer.out_features, width, dtype=dtype, device=device)  # [L, out, S*R]

    def set_slot(self, slot: int, deltas: dict[int | None, ModuleDelta] | None) -> None:
        """Write an adapter's deltas for this layer into `slot` (None or no entry: zeros)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for shard, delta in (deltas or {}).items():
            index = shard or 0
            cols = slice(index * self.max_rank, index * self.max_rank + delta.rank)
            rows = slice(0, self.lora_b.shape[1]) if shard is None else \
                slice(self.offsets[shard], self.offsets[shard] + self.out_sizes[shard])
            self.lora_a[slot, cols].copy_(delta.a)
            self.lora_b[slot, rows, cols].copy_(delta.b)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.use_triton and x.is_cuda and (torch.cuda.is_current_stream_capturing()
                                               or (state.groups and x.shape[0] <= TRITON_MAX_TOKENS)):
            from ondo.lora.triton_ops import add_lora

            add_lora(x, self.lora_a, self.lora_b, state.token_slots[:x.shape[0]], out)
            return out
        for slot, rows in state.groups:
            delta = (x[rows] @ self.lora_a[slot].t()) @ self.lora_b[slot].t()      # [n, out]
            if isinstance(rows, slice):
                out[rows] += delta
            else:
                out.index_add_(0, rows, delta)
        return out


def add_lora_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
                       out: torch.Tensor) -> torch.Tensor:
    """Per-token reference (tests): out[t] += B[slot[t]] A[slot[t]] x[t] in float32; slot -1 adds nothing."""
    result = out.float().clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            result[t] += lora_b[slot].float() @ (lora_a[slot].float() @ x[t].float())
    return result


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
