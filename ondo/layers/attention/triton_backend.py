"""Triton attention backend for NVIDIA GPUs: paged decode (flash-decoding), paged prefill, KV write.

Implements the backend contract of `ondo.layers.attention` (see docs/architecture.md, "Attention").
Decode steps (`meta.is_decode`) are CUDA-graph capturable: no host synchronisation, every launch shape
a function of host integers only (number of sequences, heads, `meta.max_seq_len`). To capture, give
`max_seq_len` the largest length a replay will see (the block table's capacity); pad the batch with
rows whose `seq_lens` is 0 and whose `slot_mapping` is -1: they write nothing and return zeros.

Triton is imported lazily: this module imports on machines without it; `is_available()` tells.
"""
from __future__ import annotations

import functools

import torch

from ondo.layers.attention import AttentionMetadata

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_DECODE_SPLITS = 64
# One 64-key tile a program at least. Measured: on an H100, 1 x 2048 keys ran 11 us at 16 slices, 14 us at 8
# (docs/gpu_notes.md); on an H200, Llama-3-8B int4 one stream at 300 keys (max_model_len 512), 8 slices of
# 64 keys instead of 4 of 128 took 0.07 ms off a 2.76 ms step (32 in place of 64 gave 0.05).
MIN_KEYS_PER_SPLIT = 64


def is_available() -> bool:
    """True when Triton is importable and a CUDA device is present."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the Triton interpreter on the CPU: any sensible figure
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def choose_decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, sm_count: int) -> int:
    """How many key slices each (sequence, KV head) is cut into: enough programs for two per SM,
    slices of no fewer than about MIN_KEYS_PER_SPLIT keys; rounded up to a power of two, so few variants compile."""
    programs = max(num_seqs * num_kv_heads, 1)
    wanted = -(-2 * sm_count // programs)
    by_length = max(-(-max_seq_len // MIN_KEYS_PER_SPLIT), 1)
    splits = max(1, min(wanted, by_length, MAX_DECODE_SPLITS))
    return 1 << (splits - 1).bit_length()


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """Clear errors for shapes the kernels do not cover, before any launch."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q.dtype must be one of {SUPPORTED_DTYPES} for the Triton backend, got {q.dtype}")
    if kv_cache.dtype != q.dtype or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v and kv_cache must share q's dtype {q.dtype}, "
                         f"got k {k.dtype}, v {v.dtype}, kv_cache {kv_cache.dtype}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(kv_cache.shape)}")
    num_heads, head_dim = q.shape[1:]
    _, _, _, num_kv_heads, cache_head_dim = kv_cache.shape
    if not 16 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [16, {MAX_HEAD_DIM}] for the Triton backend, got {head_dim}")
    if cache_head_dim != head_dim or k.shape[1:] != (num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [T, {num_kv_heads}, {head_dim}] like kv_cache, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads must be a multiple of num_kv_heads ({num_kv_heads}), got {num_heads}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q, k, v and kv_cache must be dense in head_dim (stride 1 in the last dim)")


class TritonAttentionBackend:
    """Paged attention through Triton kernels; `decode_splits` pins the flash-decoding split count
    (None: chosen per step from the batch shape, see `choose_decode_splits`)."""

    def __init__(self, decode_splits: int | None = None):
        if decode_splits is not None and not 1 <= decode_splits <= MAX_DECODE_SPLITS:
            raise ValueError(f"decode_splits must be in [1, {MAX_DECODE_SPLITS}], got {decode_splits}")
        self.decode_splits = decode_splits

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, *, scale: float, sliding_window: int | None,
                logit_softcap: float | None, kv_written: bool = False) -> torch.Tensor:
        from ondo.layers.attention.triton_cache import write_kv_cache

        check_inputs(q, k, v, kv_cache)
        if not kv_written:
            write_kv_cache(kv_cache, k, v, meta.slot_mapping)
        if meta.is_decode:
            return self.decode(q, kv_cache, meta, scale=scale, sliding_window=sliding_window,
                               logit_softcap=logit_softcap)
        from ondo.layers.attention.triton_prefill import paged_prefill

        return paged_prefill(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                             meta.max_query_len, scale=scale, sliding_window=sliding_window,
                             logit_softcap=logit_softcap)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, *, scale: float,
               sliding_window: int | None, logit_softcap: float | None) -> torch.Tensor:
        from ondo.layers.attention.triton_decode import paged_decode

        num_seqs, num_kv_heads = q.shape[0], kv_cache.shape[3]
        keys_seen = meta.max_seq_len if sliding_window is None else min(meta.max_seq_len, sliding_window)
        splits = self.decode_splits or choose_decode_splits(num_seqs, num_kv_heads, keys_seen, num_sms(q.device))
        return paged_decode(q, kv_cache, meta.block_tables, meta.seq_lens, scale=scale,
                            sliding_window=sliding_window, logit_softcap=logit_softcap, num_splits=splits)
