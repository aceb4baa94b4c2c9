"""The per-layer LoRA slot pool and the delta it adds, per token, to a `Linear`'s output.

Each wrapped `Linear` holds `max_loras` slots of stacked weights: A [max_loras, S*R, in] and
B [max_loras, out, S*R], with S the layer's shards (3 for q/k/v, 2 for gate/up, else 1) and R the
max_lora_rank. Shard s of an adapter uses columns [s*R, s*R + r) of A's rows and B's columns, and B
is zero outside that shard's rows, so a LoRA on q_proj changes q's rows only while the merged
layer still runs as two matrix products. Ranks below R are zero-padded; the scaling is folded into B.

Which slot each token uses is written once per step by the manager: as `groups` (slot, rows) on the
host and, for the kernels, as the static device buffer `token_groups` (ondo/lora/triton_ops.py) that
CUDA graphs read. A step with no adapter token adds nothing: eager layers return at once, and decode
steps replay graphs captured without the LoRA kernels (`graph_variant`). Two ways to add the delta:
- CPU: one x·Aᵀ·Bᵀ per adapter present in the step, over its rows. The alternative, gathering each
  token's A and B and running a batched matmul, copies T adapters' weights per layer (a 2048-token
  prefill would move 2048 × 16 × 4096 values for one A); grouping reads each adapter once and runs as
  ordinary GEMMs.
- GPU, every step (decode inside CUDA graphs, prefill eagerly): the grouped Triton kernels, shrink then
  expand, one program per adapter group and tile, reading the grouping from the device buffer. Two
  launches per layer whatever the number of adapters: per-adapter GEMMs in a prefill of 8 adapters
  cost ~30 launches per layer, ~0.1 s of host time per step on Llama-3-8B (measured on an H200).
  In small decode graphs both run on a side stream beside the base product (`begin`), so a decode
  token waits only for one add per layer: the kernels are latency-bound, not bandwidth-bound.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ondo.layers.linear import Linear
from ondo.lora.adapter import ModuleDelta


def token_spans(seq_slots: list[int], query_lens: list[int]) -> dict[int, list[tuple[int, int]]]:
    """slot -> the [start, end) rows of the step's tokens that use it, from each sequence's slot
    (-1 = base model, in no span) and number of tokens."""
    spans: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for slot, count in zip(seq_slots, query_lens):
        if slot >= 0:
            spans.setdefault(slot, []).append((start, start + count))
        start += count
    return spans


def span_rows(spans: list[tuple[int, int]]) -> np.ndarray:
    """The row indices [start, end) spans cover, in order (int32)."""
    return np.concatenate([np.arange(a, b, dtype=np.int32) for a, b in spans])


class LoRAStepState:
    """What every LoRA layer reads during a forward, written once per step by the manager."""

    def __init__(self, max_loras: int, max_tokens: int, device: torch.device):
        self.device = device
        self.spans: dict[int, list[tuple[int, int]]] = {}   # slot -> its token rows [start, end); empty: base only
        self._groups: list[tuple[int, slice | torch.Tensor]] | None = None
        self.use_triton = device.type == "cuda" and _triton_available()
        self.token_groups = None
        if self.use_triton:
            from ondo.lora.triton_ops import TokenGroups

            self.token_groups = TokenGroups(max_loras, max_tokens, device)
        self.in_graph = False   # capturing the decode graphs that run the LoRA kernels
        self._side_stream: torch.cuda.Stream | None = None

    def side_stream(self) -> torch.cuda.Stream:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream

    def set_spans(self, spans: dict[int, list[tuple[int, int]]]) -> None:
        self.spans, self._groups = spans, None

    @property
    def groups(self) -> list[tuple[int, slice | torch.Tensor]]:
        """(slot, rows of x) for the grouped GEMMs, made on first use in a step: graph replays never
        need them, and a slot's scattered rows cost a host-to-device copy."""
        if self._groups is None:
            self._groups = [(slot, _rows(spans, self.device)) for slot, spans in self.spans.items()]
        return self._groups

    @contextmanager
    def graph_variant(self, with_lora: bool):
        """Capture decode graphs with the LoRA kernels (replayed for steps with adapter tokens) or
        without them (steps on the base model alone, which then cost what they cost without LoRA)."""
        saved = self.spans
        self.set_spans({})
        self.in_graph = with_lora
        try:
            yield
        finally:
            self.set_spans(saved)
            self.in_graph = False


# Up to this many tokens a decode graph computes the delta beside the base product. Measured on an H200
# with benchmarks/lora_kernels.py (Llama-3-8B's 128 LoRA layers in one graph), cost over the base
# matmuls in line / beside: 1 token +1.08 / +0.39 ms, 64 tokens over 8 adapters +1.73 / +1.03; at 256
# tokens a side stream did not help (+2.07 / +2.06 in a sweep), so larger graphs run in line.
SIDE_STREAM_TOKENS = 64
# Beside the base product the shrink adds its K splits atomically into one zeroed row per token (the
# memset is off the critical path there), so short splits cost the expand nothing: 64 tokens over 8
# adapters +1.04 ms with splits of 128 summed, +1.50 with splits of 512 kept apart (a sweep, same graph).
SIDE_SPLIT_K, SIDE_BLOCK_K = 128, 64


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

    def begin(self, x: torch.Tensor) -> torch.Tensor | None:
        """Called before the base product. Inside decode graphs of up to SIDE_STREAM_TOKENS tokens, the
        whole delta (shrink, then expand into a zeroed buffer) runs on a side stream beside the base
        product, which leaves only an add after it; returns that delta. Elsewhere None (`finish` does all)."""
        state = self.state
        if not (state.in_graph and x.shape[0] <= SIDE_STREAM_TOKENS):
            return None
        from ondo.lora.triton_ops import lora_expand, lora_shrink

        side = state.side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            delta = torch.zeros(x.shape[0], self.lora_b.shape[1], dtype=x.dtype, device=x.device)   # [T, out]
            partials = lora_shrink(x, self.lora_a, state.token_groups, SIDE_SPLIT_K, SIDE_BLOCK_K, summed=True)
            return lora_expand(partials, self.lora_b, state.token_groups, delta, accumulate=False)

    def finish(self, x: torch.Tensor, out: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """out + x Aᵀ Bᵀ for the rows of each adapter (`delta`: what `begin` returned)."""
        state = self.state
        if delta is not None:
            torch.cuda.current_stream().wait_stream(state.side_stream())
            return out.add_(delta)
        if state.in_graph or (state.spans and state.use_triton and x.is_cuda):
            from ondo.lora.triton_ops import add_lora

            return add_lora(x, self.lora_a, self.lora_b, state.token_groups, out)
        for slot, rows in state.groups:   # CPU: one pair of GEMMs per adapter in the step
            product = (x[rows] @ self.lora_a[slot].t()) @ self.lora_b[slot].t()    # [n, out]
            if isinstance(rows, slice):
                out[rows] += product
            else:
                out.index_add_(0, rows, product)
        return out


def add_lora_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: list[int],
                       out: torch.Tensor) -> torch.Tensor:
    """Per-token reference (tests): out[t] += B[slot[t]] A[slot[t]] x[t] in float32; slot -1 adds nothing."""
    result = out.float().clone()
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            result[t] += lora_b[slot].float() @ (lora_a[slot].float() @ x[t].float())
    return result


def _rows(spans: list[tuple[int, int]], device: torch.device) -> slice | torch.Tensor:
    if len(spans) == 1:
        return slice(*spans[0])
    return torch.from_numpy(span_rows(spans)).to(device, torch.long, non_blocking=True)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
