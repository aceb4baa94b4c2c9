"""Portable paged attention in plain PyTorch: the reference every fast backend is tested against.

Decode steps (one query per sequence) run as one batched attention over the gathered, padded K/V;
sequences with several queries (prefill chunks) run one at a time. Works on CPU and GPU.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ondo.layers import cpu_kernels
from ondo.layers.attention import AttentionMetadata


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Keys and values of the new tokens into their slots, with one copy for both."""
    num_kv_heads, head_dim = k.shape[1:]
    if (cpu_kernels.usable(k) and kv_cache.dtype in cpu_kernels.KV_DTYPES and kv_cache.is_contiguous() and k.stride(2) == 1
            and k.stride(1) == head_dim and v.stride()[1:] == k.stride()[1:] and slot_mapping.dtype == torch.int64
            and slot_mapping.is_contiguous()):
        cpu_kernels.write_kv(kv_cache, k, v, slot_mapping)
        return
    slots = kv_cache.view(2, -1, num_kv_heads, head_dim)                       # [2, num_slots, KVH, D]
    slots.index_copy_(1, slot_mapping, _stacked(k, v).to(kv_cache.dtype))   # rounded to a narrower cache


def _stacked(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[2, T, KVH, D]: a view when v follows k in every row (the k|v part of the merged qkv output), else a copy."""
    row_stride, head_stride, unit = k.stride()
    width = head_stride * k.shape[1]
    if (unit == 1 and head_stride == k.shape[2] and v.stride() == k.stride() and v.dtype == k.dtype
            and v.data_ptr() == k.data_ptr() + width * k.element_size()):
        return k.as_strided((2, *k.shape), (width, row_stride, head_stride, 1))
    return torch.stack((k, v))


def gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int,
              block_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first `num_tokens` positions of each sequence: [num_seqs, num_tokens, KVH, D] each.

    `block_ids` (the flattened, int64 first blocks of every table) may be passed in when it is shared by
    every layer of a step, so that it is built once per step instead of once per layer.
    """
    num_seqs = block_tables.shape[0]
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_blocks = -(-num_tokens // block_size)
    if block_ids is None:
        block_ids = decode_block_ids(block_tables, num_blocks)
    # index_select, not advanced indexing (kv_cache[:, tables]): on a CPU the latter costs milliseconds per call.
    blocks = kv_cache.index_select(1, block_ids)               # [2, S * nb, block_size, KVH, D]
    kv = blocks.view(2, num_seqs, num_blocks * block_size, num_kv_heads, head_dim)[:, :, :num_tokens]
    return kv[0], kv[1]


def decode_block_ids(block_tables: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The first `num_blocks` block ids of every table, flat and int64: [S * num_blocks]."""
    return block_tables[:, :num_blocks].reshape(-1).long()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           logit_softcap: float | None) -> torch.Tensor:
    """q [S, H, Q, D], k/v [S, KVH, K, D], mask [S, 1, Q, K] bool (True = may attend; None = all) -> [S, H, Q, D].

    GQA without copying K/V: the G query heads that share a KV head are folded into the query
    dimension (query head h = kv_head * G + g, as transformers' repeat_kv orders them).
    """
    num_seqs, num_heads, num_queries, head_dim = q.shape
    group = num_heads // k.shape[1]
    if k.dtype != q.dtype:   # a cache narrower than the activations (kv_cache_dtype): computed in theirs
        k, v = k.to(q.dtype), v.to(q.dtype)
    if group > 1:
        q = q.reshape(num_seqs, k.shape[1], group * num_queries, head_dim)   # rows g * Q + query
        if num_queries > 1:
            mask = mask.repeat(1, 1, group, 1)                                # [S, 1, G * Q, K]
    if logit_softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale       # [S, KVH, G * Q, K]
        scores = logit_softcap * torch.tanh(scores / logit_softcap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
    return out.reshape(num_seqs, num_heads, num_queries, head_dim)


def visibility_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, seq_lens: torch.Tensor,
                    sliding_window: int | None) -> torch.Tensor:
    """query_pos [S, Q], key_pos [K], seq_lens [S] -> [S, 1, Q, K]: causal, inside the sequence and the window."""
    qp, kp = query_pos[:, :, None], key_pos[None, None, :]
    mask = (kp <= qp) & (kp < seq_lens[:, None, None])
    if sliding_window is not None:
        mask &= (qp - kp) < sliding_window
    return mask[:, None]


class TorchAttentionBackend:
    """Decode steps on a CPU reuse what every layer of the step shares (the block ids to gather and the
    visibility mask), built by the first layer: 30 layers otherwise rebuild the same small tensors, and
    on a CPU each of those ops costs tens of microseconds against a step of a few milliseconds."""

    def __init__(self):
        self._step_meta: AttentionMetadata | None = None
        self._step_shared: dict = {}

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, *, scale, sliding_window, logit_softcap,
                kv_written: bool = False):
        if not kv_written:
            write_kv(kv_cache, k, v, meta.slot_mapping)
        if meta.is_decode:
            return self._decode(q, kv_cache, meta, scale, sliding_window, logit_softcap)
        out = torch.empty_like(q)
        start = 0
        for i, (query_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            seq_q = q[start:start + query_len]                                   # [Q, H, D]
            keys, values = gather_kv(kv_cache, meta.block_tables[i:i + 1], seq_len)  # [1, K, KVH, D]
            query_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)[None]
            key_pos = torch.arange(seq_len, device=q.device)
            mask = visibility_mask(query_pos, key_pos, meta.seq_lens[i:i + 1].to(q.device), sliding_window)
            o = attend(seq_q.transpose(0, 1)[None], keys.transpose(1, 2), values.transpose(1, 2),
                       mask, scale, logit_softcap)                               # [1, H, Q, D]
            out[start:start + query_len] = o[0].transpose(0, 1)
            start += query_len
        return out

    def _decode(self, q, kv_cache, meta, scale, sliding_window, logit_softcap):
        if cpu_kernels.attention_inputs_fit(q, kv_cache, meta.block_tables, meta.seq_lens):
            # In place through the block tables: no gather of K/V, no mask, one call for every sequence.
            return cpu_kernels.decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale,
                                                sliding_window, logit_softcap)
        block_ids, mask = self._decode_inputs(q.device, kv_cache.shape[2], meta, sliding_window)
        if mask is None and block_ids is not None and len(meta.seq_lens_cpu) == 1:
            first = self._step_shared.get("first_block")
            blocks = kv_cache.index_select(1, block_ids) if first is None else \
                kv_cache[:, first:first + block_ids.shape[0]]        # [2, nb, block_size, KVH, D]
            return self._decode_one(q, blocks, meta.max_seq_len, scale, logit_softcap)
        keys, values = gather_kv(kv_cache, meta.block_tables, meta.max_seq_len, block_ids)   # [S, K, KVH, D]
        o = attend(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), mask, scale, logit_softcap)
        return o[:, :, 0]                                                        # [S, H, D]

    @staticmethod
    def _decode_one(q, blocks, seq_len: int, scale, logit_softcap):
        """One sequence, every cached key visible (the single-stream CPU decode): the same numbers as the
        batched path in a third of its tensor ops. q [1, H, D], blocks [2, nb, block_size, KVH, D] (the
        sequence's blocks in order, each of K and V contiguous) -> [1, H, D]."""
        _, num_heads, head_dim = q.shape
        num_kv_heads = blocks.shape[3]
        token_stride = num_kv_heads * head_dim
        size, stride = (1, num_kv_heads, seq_len, head_dim), (blocks.stride(1), head_dim, token_stride, 1)
        keys = blocks[0].as_strided(size, stride)                     # [1, KVH, K, D]
        values = blocks[1].as_strided(size, stride)
        grouped = q.view(1, num_kv_heads, num_heads // num_kv_heads, head_dim)   # [1, KVH, G, D]: GQA folded
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        if logit_softcap is None:
            out = F.scaled_dot_product_attention(grouped, keys, values, scale=scale)
        else:
            out = attend(q[:, :, None], keys, values, None, scale, logit_softcap)   # [1, H, 1, D]
        return out.view(1, num_heads, head_dim)

    def _decode_inputs(self, device, block_size: int, meta: AttentionMetadata, sliding_window: int | None):
        """(block ids [S * nb] or None, mask [S, 1, 1, K] or None) of a decode step, shared by its layers.

        No mask at all when nothing is hidden: one sequence (its keys end at its own length) outside any
        sliding window; SDPA then gives the same numbers as with an all-True mask.
        """
        if device.type != "cpu":    # static buffers may be rewritten between runs: nothing is kept
            return None, self._decode_mask(device, meta, sliding_window)
        if meta is not self._step_meta:
            self._step_meta, self._step_shared = meta, {}
        shared = self._step_shared
        if "block_ids" not in shared:
            num_blocks = -(-meta.max_seq_len // block_size)
            shared["block_ids"] = decode_block_ids(meta.block_tables, num_blocks)
            if len(meta.seq_lens_cpu) == 1:   # blocks that follow each other are read in place
                ids = shared["block_ids"].numpy()
                shared["first_block"] = int(ids[0]) if (np.diff(ids) == 1).all() else None
        key = ("mask", sliding_window)
        if key not in shared:
            window_unseen = sliding_window is not None and meta.max_seq_len > sliding_window
            needs_mask = len(meta.seq_lens_cpu) > 1 or window_unseen or meta.seq_lens_cpu[0] != meta.max_seq_len
            shared[key] = self._decode_mask(device, meta, sliding_window) if needs_mask else None
        return shared["block_ids"], shared[key]

    @staticmethod
    def _decode_mask(device, meta: AttentionMetadata, sliding_window: int | None) -> torch.Tensor:
        seq_lens = meta.seq_lens.to(device).long()
        key_pos = torch.arange(meta.max_seq_len, device=device)
        return visibility_mask((seq_lens - 1)[:, None], key_pos, seq_lens, sliding_window)   # [S, 1, 1, K]
