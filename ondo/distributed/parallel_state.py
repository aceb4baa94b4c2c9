"""Which tensor-parallel rank this process is, and the collectives layers call.

Layers import only this module: with no group set up (one device) every call is the identity, so a
model file runs unchanged at tensor_parallel_size 1. The group is set up once per process by the
worker start-up code (`init_tensor_parallel`), never by a layer.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger("ondo")

_group: dist.ProcessGroup | None = None
_rank, _size = 0, 1
_symmetric: SymmetricAllReduce | None = None


def init_tensor_parallel(group: dist.ProcessGroup | None, rank: int, size: int) -> None:
    """Record the tensor-parallel group of this process (None, 0, 1 = no parallelism)."""
    global _group, _rank, _size, _symmetric
    _group, _rank, _size, _symmetric = group, rank, size, None


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def tp_group() -> dist.ProcessGroup | None:
    return _group


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place; the identity on one rank. Every rank takes the same branch: the
    choice depends only on the tensor's shape and dtype."""
    if _size > 1:
        if _symmetric is not None and _symmetric.fits(tensor):
            return _symmetric(tensor)
        dist.all_reduce(tensor, group=_group)
    return tensor


def broadcast_from_first(tensor: torch.Tensor | None, numel: int, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (the others pass None and get a new one); queued on the
    device's stream, the host does not wait. The identity on one rank."""
    if _size == 1:
        return tensor
    if tensor is None:
        tensor = torch.empty(numel, dtype=dtype, device=device)
    dist.broadcast(tensor, src=dist.get_global_rank(_group, 0), group=_group)
    return tensor


class SymmetricAllReduce:
    """Sum over the GPUs of one node through a buffer each of them maps (torch symmetric memory, peer
    to peer over NVLink). NCCL pays about 19 us for a decode step's activations inside a CUDA graph on
    an H200 pair, this about 8, and a layer has two: at Llama-3-70B's 160 per step the difference is
    2 ms of a 20 ms step. Two-shot (vLLM's choice for two ranks on Hopper); never the multimem kernels,
    which need NVLink multicast. Larger tensors (long prefills) and other dtypes go through NCCL."""

    MAX_BYTES = 16 << 20   # a 2048-token step of a 4096-wide model; NCCL is as fast beyond

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype):
        import torch.distributed._symmetric_memory as symm_mem

        self.buffer = symm_mem.empty(self.MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, group.group_name)
        self.group_name = group.group_name

    def fits(self, tensor: torch.Tensor) -> bool:
        # The kernel splits the tensor over the ranks in 16-byte vectors.
        return (tensor.dtype == self.buffer.dtype and tensor.numel() <= self.buffer.numel()
                and tensor.numel() % (16 * _size) == 0 and tensor.is_contiguous())

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        staged = self.buffer[:tensor.numel()]
        staged.copy_(tensor.view(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
        tensor.view(-1).copy_(staged)
        return tensor


def enable_symmetric_all_reduce(device: torch.device, dtype: torch.dtype) -> bool:
    """Every rank of a one-node GPU group calls this once, at the same point: sets up the symmetric
    buffer, checks one sum through it, and keeps it only if that worked on every rank (NCCL otherwise).
    Opt-in (ONDO_SYMMETRIC_ALL_REDUCE=1): end to end it has not made a TP=2 engine faster yet, and a
    second engine in the same process hung while starting after the first one left (docs/distributed.md)."""
    global _symmetric
    if (_size == 1 or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float32)   # the kernel's dtypes
            or os.environ.get("ONDO_SYMMETRIC_ALL_REDUCE", "0") != "1"):
        return False
    candidate, works = None, False
    try:
        candidate = SymmetricAllReduce(_group, device, dtype)
        probe = torch.full((16 * _size,), _rank + 1.0, dtype=dtype, device=device)
        works = bool(torch.all(candidate(probe) == _size * (_size + 1) / 2))
    except Exception as error:  # noqa: BLE001 -- no peer access, an old driver: NCCL still works
        logger.warning("symmetric-memory all-reduce unavailable, using NCCL: %s", error)
    agreed = torch.tensor([int(works)], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=_group)
    _symmetric = candidate if agreed.item() else None
    return _symmetric is not None


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


def kv_heads_per_rank(num_kv_heads: int, size: int | None = None) -> tuple[int, int]:
    """(KV heads one rank holds, ranks that hold each KV head) over `size` ranks (default: this
    process's group), vLLM's rule. The layers and the KV cache sizing both ask here.

    With at least as many KV heads as ranks they are split (they must divide); with fewer, each KV
    head is replicated on size / num_kv_heads consecutive ranks, exactly the ranks whose query
    heads read it, so every rank holds one KV head."""
    size = _size if size is None else size
    if num_kv_heads >= size:
        if num_kv_heads % size:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) must be divisible by tensor_parallel_size ({size})")
        return num_kv_heads // size, 1
    if size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({size}) must be a multiple of num_key_value_heads "
                         f"({num_kv_heads}) when it is larger")
    return 1, size // num_kv_heads
