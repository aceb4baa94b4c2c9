"""The workers of ranks 1..N-1: each joins the process group, builds and loads its shard of the model,
allocates its share of the KV cache, captures its CUDA graphs, then runs every StepInput rank 0 sends
until told to stop. Rank 0 is the engine's own process (see executor.py).

On another node: `python -m ondo.distributed.worker --tensor-parallel-size N --nnodes K --node-rank R`
with MASTER_ADDR / MASTER_PORT pointing at node 0 (docs/distributed.md).
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ondo.distributed.parallel_state import enable_symmetric_all_reduce, init_tensor_parallel
from ondo.distributed.step_channel import StepChannel, open_channel

logger = logging.getLogger("ondo")

STOP = "stop"
# Waiting for the next step may last as long as the server idles: only collectives inside a step
# (the compute group) get the short, configurable timeout.
IDLE_TIMEOUT = timedelta(days=365)
ABORT_WAIT_S = 10.0   # how long leave_group waits for NCCL's abort


def collective_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("ONDO_COLLECTIVE_TIMEOUT_S", "600")))


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the ranks meet: a tcp:// address (one node) or env:// (MASTER_ADDR / MASTER_PORT)."""
    init_method: str
    world_size: int
    nnodes: int = 1
    node_rank: int = 0

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes


def join_group(rank: int, rendezvous: Rendezvous, device: torch.device):
    """Joins the world group (NCCL on GPUs, gloo on the CPU: the layers' collectives) and a gloo group
    for rank 0's step messages; records the tensor-parallel group for the layers. Returns the channel
    of rank 0's messages: shared memory between GPU ranks of one node (ONDO_TP_CHANNEL=gloo|shm overrides)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        raise RuntimeError("this process is still in the process group of an earlier tensor-parallel engine "
                           "(its NCCL group did not finish aborting, see the warning above); start a new process")
    dist.init_process_group(backend, init_method=rendezvous.init_method, rank=rank,
                            world_size=rendezvous.world_size, timeout=collective_timeout())
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    init_tensor_parallel(dist.group.WORLD, rank, rendezvous.world_size)
    gloo = StepChannel(control)
    choice = os.environ.get("ONDO_TP_CHANNEL", "shm" if device.type == "cuda" else "gloo")
    return open_channel(gloo, rank, rendezvous.world_size, shared_memory=choice == "shm" and rendezvous.nnodes == 1)


def finish_device_work() -> None:
    """Before a rank leaves: wait for the steps it has launched. The last step may still be running (a
    decode step launched ahead and then discarded); a rank that left in the middle of its collectives
    would leave its peers' kernels waiting for it, and their NCCL abort waiting for those kernels."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        torch.cuda.synchronize()


def leave_group(abort_wait_s: float = ABORT_WAIT_S) -> None:
    """Every rank, when the engine stops. NCCL groups are aborted, not destroyed: destroying finalizes
    each communicator together with its peers, so a rank waits forever for a peer that has already
    left or that waits for it to leave first (rank 0 waits for its workers to exit before leaving).
    Aborting is local to the rank, but NCCL's abort can still block (a kernel waiting on a peer that
    is gone): it runs in a thread that is given up after `abort_wait_s`, so stopping never hangs."""
    init_tensor_parallel(None, 0, 1)
    if not dist.is_initialized():
        return
    if dist.get_backend() != "nccl":
        dist.destroy_process_group()
        return
    aborting = threading.Thread(target=dist.distributed_c10d._abort_process_group, name="ondo-nccl-abort",
                                daemon=True)
    aborting.start()
    aborting.join(abort_wait_s)
    if aborting.is_alive():
        logger.warning("the NCCL group did not finish aborting within %.0f s; leaving it behind", abort_wait_s)


def agree_num_blocks(channel, fit: int) -> int:
    """The fewest KV blocks any rank can hold: every rank then allocates that many."""
    count = torch.tensor([fit], dtype=torch.int64)
    gloo = getattr(channel, "fallback", channel)
    dist.all_reduce(count, op=dist.ReduceOp.MIN, group=gloo.group)
    return int(count.item())


def worker_main(rank: int, rendezvous: Rendezvous, device_type: str, num_threads: int) -> None:
    """Entry point of a spawned worker process."""
    _exit_with_parent()
    logging.basicConfig(level=os.environ.get("ONDO_LOG_LEVEL", "WARNING").upper(),
                        format=f"%(asctime)s rank {rank} %(levelname)s %(message)s")
    torch.set_num_threads(num_threads)
    local_rank = rank % rendezvous.ranks_per_node
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    channel = join_group(rank, rendezvous, device)
    try:
        _serve(channel, device, single_node=rendezvous.nnodes == 1)
    except Exception:
        logger.exception("tensor-parallel worker rank %d failed", rank)
        sys.exit(1)
    finally:
        channel.close()
        leave_group()


def _serve(channel: StepChannel, device: torch.device, single_node: bool) -> None:
    from ondo.engine.engine import kv_budget_bytes, kv_cache_spec, resolve_kv_cache_dtype
    from ondo.engine.model_runner import ModelRunner, StepInput
    from ondo.loader import load_model

    config = channel.recv()
    if config == STOP:
        return
    if config.seed is not None:
        torch.manual_seed(config.seed)
    loaded, dtype = load_model(config, device)
    if single_node:   # as rank 0's TensorParallelExecutor.model_loaded, at the same point
        enable_symmetric_all_reduce(device, dtype)
    max_model_len = channel.recv()
    if max_model_len == STOP:
        return
    spec = kv_cache_spec(loaded.hf_config, resolve_kv_cache_dtype(config, dtype, device, loaded.model),
                         config.tensor_parallel_size)
    fit = kv_budget_bytes(config, device, spec, max_model_len) // (spec.bytes_per_token() * config.block_size)
    num_blocks = agree_num_blocks(channel, fit)
    if num_blocks * config.block_size < max_model_len:
        return   # rank 0 reports that the cache is too small
    runner = ModelRunner(loaded.model, spec, num_blocks, config.block_size, device,
                         enforce_eager=config.enforce_eager, max_num_seqs=config.max_num_seqs,
                         max_model_len=max_model_len)
    while True:
        message = channel.recv()
        if isinstance(message, StepInput):
            runner.run(message)   # the logits are rank 0's; here only the collectives matter
        elif message == STOP:
            finish_device_work()           # also eager: no collective of this rank still running
            runner.release_cuda_graphs()   # before NCCL's abort, which graphs holding NCCL kernels block
            return


def _exit_with_parent() -> None:
    """Linux: the kernel sends SIGTERM when the engine's process dies, even by SIGKILL: no orphans."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---- command line: one rank (started by rank 0 or by a node's launcher), or a whole node ------------

def spawn_workers(ranks, rendezvous: Rendezvous, device_type: str) -> list[subprocess.Popen]:
    """Starts one `python -m ondo.distributed.worker --rank R` per rank. A fresh interpreter rather than
    multiprocessing's spawn, which would re-run the user's script (a script without a __main__ guard
    would then start workers of its own)."""
    import torch

    num_threads = max(1, torch.get_num_threads() // rendezvous.ranks_per_node)
    return [subprocess.Popen([sys.executable, "-m", "ondo.distributed.worker", "--rank", str(rank),
                              "--init-method", rendezvous.init_method, "--tensor-parallel-size",
                              str(rendezvous.world_size), "--nnodes", str(rendezvous.nnodes),
                              "--node-rank", str(rendezvous.node_rank), "--device", device_type,
                              "--threads", str(num_threads)])
            for rank in ranks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ondo.distributed.worker",
                                     description="tensor-parallel ranks of a node beyond node 0 (docs/distributed.md)")
    parser.add_argument("--tensor-parallel-size", type=int, required=True, help="ranks over all nodes")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes, node 0 included (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node, 1..nnodes-1")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="as node 0's --device (default auto: cuda when available)")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--init-method", default="env://", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rendezvous = Rendezvous(args.init_method, args.tensor_parallel_size, args.nnodes, args.node_rank)
    if args.rank is not None:
        worker_main(args.rank, rendezvous, args.device, args.threads or torch.get_num_threads())
        return 0
    from ondo.distributed.executor import check_world

    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    check_world(rendezvous, device_type)
    first = args.node_rank * rendezvous.ranks_per_node
    processes = spawn_workers(range(first, first + rendezvous.ranks_per_node), rendezvous, device_type)
    codes = [process.wait() for process in processes]
    return max((abs(code) for code in codes), default=0)


if __name__ == "__main__":
    sys.exit(main())
