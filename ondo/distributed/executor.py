"""Rank 0's side of tensor parallelism: it starts the other ranks' workers, joins their group, and
hands each step's StepInput to them before running it itself (`ModelRunner.step_sender`).

Failures end in an error, never a hang: a watchdog thread waits on the workers' process sentinels;
once one has died, the next step raises `TensorParallelError` (the server then exits non-zero), and
on NCCL the group is aborted so that a step stuck in a collective with the dead rank returns.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
import subprocess

import torch
import torch.distributed as dist

from ondo.config import ConfigError, EngineConfig
from ondo.distributed.parallel_state import enable_symmetric_all_reduce
from ondo.distributed.sharding import check_splittable, read_hf_config
from ondo.distributed.worker import (STOP, Rendezvous, agree_num_blocks, finish_device_work, join_group, leave_group,
                                     spawn_workers)

logger = logging.getLogger("ondo")


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died or the ranks fell out of step: the engine cannot go on."""


def check_world(rendezvous: Rendezvous, device_type: str) -> None:
    if rendezvous.nnodes < 1 or rendezvous.world_size % rendezvous.nnodes:
        raise ConfigError(f"tensor_parallel_size ({rendezvous.world_size}) must be divisible by the number of "
                          f"nodes ({rendezvous.nnodes})")
    if not 0 <= rendezvous.node_rank < rendezvous.nnodes:
        raise ConfigError(f"node rank must be in [0, {rendezvous.nnodes - 1}], got {rendezvous.node_rank}")
    per_node = rendezvous.ranks_per_node
    if device_type == "cuda" and torch.cuda.device_count() < per_node:
        raise ConfigError(f"tensor_parallel_size {rendezvous.world_size} needs {per_node} GPUs"
                          f"{' per node' if rendezvous.nnodes > 1 else ''}, {torch.cuda.device_count()} visible")


def _local_rendezvous(world_size: int) -> Rendezvous:
    """One node: a free port on the loopback. Several: ONDO_NNODES with MASTER_ADDR / MASTER_PORT."""
    nnodes = int(os.environ.get("ONDO_NNODES", "1"))
    if nnodes > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ConfigError(f"ONDO_NNODES={nnodes} needs {name} (node 0's address) in the environment")
        return Rendezvous("env://", world_size, nnodes, 0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return Rendezvous(f"tcp://127.0.0.1:{port}", world_size)


class TensorParallelExecutor:
    """Spawns ranks 1..N-1 of this node, makes this process rank 0, and sends them every step."""

    def __init__(self, config: EngineConfig, device: torch.device):
        size = config.tensor_parallel_size
        hf_config = read_hf_config(config)
        if hf_config is not None:
            check_splittable(hf_config, size)
        self.rendezvous = _local_rendezvous(size)
        check_world(self.rendezvous, device.type)
        if device.type == "cuda":
            torch.cuda.set_device(0)
        self.device = device
        self.dead_error: str | None = None
        self.stopping = threading.Event()   # set before the workers are told to leave: their exit is no death
        # Called (weakly: the engine may be gone) before this rank leaves the group, e.g. to release
        # CUDA graphs that hold NCCL kernels (see `CudaGraphRunner.release`).
        self.before_leaving: list[weakref.WeakMethod] = []
        self.processes = spawn_workers(range(1, self.rendezvous.ranks_per_node), self.rendezvous, device.type)
        try:
            self.channel = self._unless_a_worker_dies(join_group, 0, self.rendezvous, device)
            self.channel.send(config)   # the workers load the model while this process does
        except BaseException:
            self._stop_processes()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self.processes, self.channel, True, self.stopping,
                                          self.before_leaving)
        for rank, process in enumerate(self.processes, start=1):
            threading.Thread(target=self._watch, args=(rank, process), name=f"ondo-tp-watch-{rank}", daemon=True).start()
        logger.info("tensor parallelism: %d ranks (%s), %d node(s)", size, dist.get_backend(), self.rendezvous.nnodes)

    def model_loaded(self, dtype: torch.dtype) -> None:
        """Each rank, its shard loaded: GPUs of one node set up their symmetric-memory all-reduce."""
        if self.rendezvous.nnodes == 1:
            self._unless_a_worker_dies(enable_symmetric_all_reduce, self.device, dtype)

    def agree_num_blocks(self, fit: int, max_model_len: int) -> int:
        """Every rank sizes its KV cache for `max_model_len`; all allocate the smallest count."""
        self.channel.send(max_model_len, alive=self._all_alive)
        return self._unless_a_worker_dies(agree_num_blocks, self.channel, fit)

    def _unless_a_worker_dies(self, fn, *args):
        """`fn(*args)`, a start-up step every rank takes part in; raises if a worker dies meanwhile
        (failing to start or to load the model) instead of waiting for it forever."""
        outcome: dict = {}

        def call() -> None:
            try:
                outcome["value"] = fn(*args)
            except BaseException as error:  # noqa: BLE001 -- raised in the caller's thread below
                outcome["error"] = error

        thread = threading.Thread(target=call, name="ondo-tp-start", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.05)
            dead = next(((rank, p) for rank, p in enumerate(self.processes, start=1) if p.poll() is not None), None)
            if dead is not None and thread.is_alive():
                raise TensorParallelError(f"{_death(*dead)} while starting (its log is above)")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    # ---- every step ---------------------------------------------------------------------------

    def __call__(self, step) -> None:
        """`ModelRunner.step_sender`: the other ranks get the step before rank 0 runs it."""
        self.check_alive()
        self.channel.send(step, alive=self._all_alive)

    def _all_alive(self) -> bool:
        return self.dead_error is None and all(p.poll() is None for p in self.processes)

    def step_failed(self, error: BaseException) -> None:
        """Rank 0's part of a step raised: the others may be waiting in a collective it never joined."""
        self.dead_error = self.dead_error or f"a step failed on rank 0 ({error}), so the ranks are out of step"

    def check_alive(self) -> None:
        if self.dead_error is None:
            for rank, process in enumerate(self.processes, start=1):
                if process.poll() is not None:
                    self.dead_error = _death(rank, process)
                    break
        if self.dead_error is not None:
            raise TensorParallelError(f"tensor parallelism stopped: {self.dead_error}; restart the engine")

    def _watch(self, rank: int, process: subprocess.Popen) -> None:
        process.wait()
        if self.stopping.is_set():
            return
        self.dead_error = self.dead_error or _death(rank, process)
        logger.error("tensor-parallel worker died: %s", self.dead_error)
        if dist.is_initialized() and dist.get_backend() == "nccl":
            try:   # a step waiting on the dead rank in an NCCL collective returns with an error
                dist.distributed_c10d._abort_process_group(dist.group.WORLD)
            except Exception:  # noqa: BLE001 -- best effort: the collective timeout still ends it
                logger.exception("aborting the NCCL group failed")

    def shutdown(self) -> None:
        if self.stopping.is_set():
            return
        self._finalizer.detach()
        _shutdown(self.processes, self.channel, self.dead_error is None, self.stopping, self.before_leaving)

    def _stop_processes(self) -> None:
        self.stopping.set()
        _stop(self.processes)


def _death(rank: int, process: subprocess.Popen) -> str:
    code = process.returncode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return f"worker rank {rank} (pid {process.pid}) died ({how})"


def _shutdown(processes: list[subprocess.Popen], channel, send_stop: bool, stopping: threading.Event,
              before_leaving: list[weakref.WeakMethod]) -> None:
    """Also run at interpreter exit (weakref.finalize) when the engine was never shut down."""
    stopping.set()
    stopped = False
    if send_stop and all(p.poll() is None for p in processes):
        try:
            finish_device_work()   # every rank's last step is complete before any of them leaves
            channel.send(STOP)
            for method in before_leaving:
                if (bound := method()) is not None:
                    bound()
            stopped = True
        except Exception:  # noqa: BLE001 -- a worker already gone: stopped below
            pass
    if stopped and dist.is_initialized() and dist.get_backend() == "nccl":
        # Now, while the workers abort too (docs/distributed.md, "Errors, never hangs").
        leave_group()
    _stop(processes, grace_s=10 if stopped else 0)
    try:
        channel.close()
        leave_group()
    except Exception:  # noqa: BLE001 -- tearing down after a failure
        logger.debug("leaving the process group failed", exc_info=True)


def _stop(processes: list[subprocess.Popen], grace_s: float = 0) -> None:
    """Waits `grace_s` for each worker to leave on its own, then terminates it (killing if need be)."""
    for process in processes:
        for stop, wait_s in ((None, grace_s), (process.terminate, 5), (process.kill, None)):
            if process.poll() is not None:
                break
            if stop is not None:
                stop()
            try:
                process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
