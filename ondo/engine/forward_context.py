"""The per-step context that attention layers read: models see tensors, never requests."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ondo.layers.attention import AttentionBackend, AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]   # per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
    attention_backend: AttentionBackend | None = None   # None = the portable torch backend
    use_fused_ops: bool = False     # Triton RMSNorm / rotary / gated activation (CUDA fast path)
    cpu_decode_stack: bool = True   # a CPU decode step's layers in one C call (ondo/models/cpu_decode.py)


_current: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("attention ran outside a forward context: call the model through the ModelRunner")
    return _current


def fused_ops_enabled() -> bool:
    """Whether layers should call the fused kernels of ondo.layers.fused in this forward."""
    return _current is not None and _current.use_fused_ops


@contextmanager
def set_forward_context(context: ForwardContext):
    global _current
    previous, _current = _current, context
    try:
        yield context
    finally:
        _current = previous
