"""Runs a function on several CPU processes joined by torch.distributed (gloo), one tensor-parallel
group over all of them, the way tensor-parallel workers start; tests in this folder import it."""
from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ondo.distributed.parallel_state import init_tensor_parallel


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_ranks(fn: Callable, *args, world_size: int = 2) -> list:
    """`fn(*args)` on `world_size` spawned processes, each with its tensor-parallel rank set; returns
    every rank's result in rank order. `fn` must be a module-level function (it is pickled by name);
    an exception on any rank is raised here with that rank's traceback."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, out), nprocs=world_size, join=True)
        return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out: str) -> None:
    os.environ["ONDO_NO_PROGRESS"] = "1"
    torch.set_num_threads(1)      # two processes on a small machine: more threads only wait on each other
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    init_tensor_parallel(dist.group.WORLD, rank, world_size)
    try:
        result = fn(*args)
    finally:
        init_tensor_parallel(None, 0, 1)
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")
