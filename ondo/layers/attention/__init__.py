"""Paged attention: the layer models call, the metadata the runner builds, and backend selection.

A backend writes the step's new K/V into the paged cache and attends every query to the cached keys
of its own sequence (causal, optional sliding window and soft-capping). `torch_backend` is the
portable reference; fast GPU backends implement the same `forward` signature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [num_tokens] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor   # [num_seqs + 1] int32: seq i's queries are tokens [qsl[i], qsl[i+1])
    seq_lens: torch.Tensor          # [num_seqs] int32: tokens of each sequence after this step (cached + new)
    block_tables: torch.Tensor      # [num_seqs, max_blocks] int32: block ids, padded with 0
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]       # host copies, so the portable backend never syncs with the device
    seq_lens_cpu: list[int]
    is_decode: bool                 # every sequence has exactly one query token


class AttentionBackend(Protocol):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, *, scale: float, sliding_window: int | None,
                logit_softcap: float | None, kv_written: bool = False) -> torch.Tensor: ...


_portable: AttentionBackend | None = None


def portable_backend() -> AttentionBackend:
    """The plain PyTorch backend: the reference, used on the CPU and with enforce_eager."""
    global _portable
    if _portable is None:
        from ondo.layers.attention.torch_backend import TorchAttentionBackend
        _portable = TorchAttentionBackend()
    return _portable


class Attention(nn.Module):
    """Multi-head attention over the paged KV cache of layer `layer_idx` (GQA when num_kv_heads < num_heads)."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int, layer_idx: int,
                 sliding_window: int | None = None, logit_softcap: float | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale, self.layer_idx = scale, layer_idx
        self.sliding_window, self.logit_softcap = sliding_window, logit_softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_written: bool = False) -> torch.Tensor:
        """kv_written: k and v are already in the cache (`rotate_and_cache`), so the backend skips its write."""
        from ondo.engine.forward_context import get_forward_context

        context = get_forward_context()
        num_tokens = q.shape[0]
        backend = context.attention_backend or portable_backend()
        out = backend.forward(
            q.view(num_tokens, self.num_heads, self.head_dim),        # [T, H, D]
            k.view(num_tokens, self.num_kv_heads, self.head_dim),     # [T, KVH, D]
            v.view(num_tokens, self.num_kv_heads, self.head_dim),
            context.kv_caches[self.layer_idx], context.attn_metadata,
            scale=self.scale, sliding_window=self.sliding_window, logit_softcap=self.logit_softcap,
            kv_written=kv_written)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def rotate_and_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, head_norms=None) -> None:
        """GPU fast path, one launch: q and k normed per head (head_norms: the (q, k) RMSNorm modules, or
        None) and rotated in place (cos / sin [T, head_dim]), k and v written to this layer's cache.
        Then call forward with kv_written=True."""
        from ondo.engine.forward_context import get_forward_context
        from ondo.layers.attention.triton_cache import rotate_and_write_kv

        context = get_forward_context()
        num_tokens = q.shape[0]
        rotate_and_write_kv(q.view(num_tokens, self.num_heads, self.head_dim),
                            k.view(num_tokens, self.num_kv_heads, self.head_dim),
                            v.view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin,
                            context.kv_caches[self.layer_idx], context.attn_metadata.slot_mapping, head_norms)
