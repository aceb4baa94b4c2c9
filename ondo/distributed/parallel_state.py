"""Which tensor-parallel rank this process is, and the collectives layers call.

Layers import only this module: with no group set up (one device) every call is the identity, so a
model file runs unchanged at tensor_parallel_size 1. The group is set up once per process by the
worker start-up code (`init_tensor_parallel`), never by a layer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_group: dist.ProcessGroup | None = None
_rank, _size = 0, 1


def init_tensor_parallel(group: dist.ProcessGroup | None, rank: int, size: int) -> None:
    """Record the tensor-parallel group of this process (None, 0, 1 = no parallelism)."""
    global _group, _rank, _size
    _group, _rank, _size = group, rank, size


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def tp_group() -> dist.ProcessGroup | None:
    return _group


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place; the identity on one rank."""
    if _size > 1:
        dist.all_reduce(tensor, group=_group)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `tensor` concatenated along `dim`, in rank order; the identity on one rank."""
    if _size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_size)]
    dist.all_gather(parts, tensor.contiguous(), group=_group)
    return torch.cat(parts, dim=dim)


def divide(total: int, what: str) -> int:
    """`total` split evenly over the ranks, or a clear error naming what does not divide."""
    if total % _size:
        raise ValueError(f"{what} ({total}) must be divisible by tensor_parallel_size ({_size})")
    return total // _size


def kv_heads_per_rank(num_kv_heads: int) -> tuple[int, int]:
    """(KV heads this rank holds, ranks that hold each KV head), vLLM's rule.

    With at least as many KV heads as ranks they are split (they must divide); with fewer, each KV
    head is replicated on tp_size / num_kv_heads consecutive ranks, exactly the ranks whose query
    heads read it, so every rank holds one KV head."""
    if num_kv_heads >= _size:
        return divide(num_kv_heads, "num_key_value_heads"), 1
    if _size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({_size}) must be a multiple of num_key_value_heads "
                         f"({num_kv_heads}) when it is larger")
    return 1, _size // num_kv_heads
