"""Decode steps replayed as CUDA graphs: one launch instead of hundreds of small kernels.

A graph is captured per batch-size bucket over static input buffers. A decode step with n sequences
replays the smallest bucket >= n; the padding rows get `seq_lens = 0` and `slot_mapping = -1`, so
the attention kernels neither read nor write the cache for them, and their outputs are dropped.
Attention is captured with `max_seq_len = max_model_len`, the most any replay can see.
A model with several forms captures one graph set per variant (the LoRA engine: with and without the
adapter kernels) and each step names the variant it replays.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, ContextManager

import numpy as np
import torch

from ondo.engine.forward_context import ForwardContext, set_forward_context
from ondo.layers.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger("ondo")


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], backend: AttentionBackend,
                 max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device,
                 variants: dict[str, Callable[[], ContextManager]] | None = None):
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.variants = variants or {"": contextlib.nullcontext}   # name -> the mode the model is captured in
        self.max_model_len, self.device = max_model_len, device
        self.buckets = batch_size_buckets(max_num_seqs)
        max_bs, max_blocks = self.buckets[-1], -(-max_model_len // block_size)
        # Device buffers the graphs read; pinned host twins so each step's copies are asynchronous.
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        # Two sets of pinned host buffers, used in turn: with async scheduling (in_flight.py)
        # a step's buffers are written while the previous step's copies may still be queued.
        self.host_sets = [{name: torch.zeros_like(getattr(self, name), device="cpu").pin_memory()
                           for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables")}
                          for _ in range(2)]
        self.host_copied: list[torch.cuda.Event | None] = [None, None]   # recorded after each set's copies
        self.num_runs = 0
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}   # (variant, batch size) -> graph
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}

    def _context(self, bs: int) -> ForwardContext:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=self.max_model_len, query_lens_cpu=[1] * bs, seq_lens_cpu=[self.max_model_len] * bs,
            is_decode=True)
        return ForwardContext(meta, self.kv_caches, self.backend, use_fused_ops=True)

    @torch.inference_mode()
    def capture(self) -> None:
        start_s = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for variant, mode in self.variants.items():
            for bs in reversed(self.buckets):   # largest first: smaller graphs reuse its memory
                with mode(), set_forward_context(self._context(bs)):
                    self.model.compute_logits(self.model(self.input_ids[:bs], self.positions[:bs]))  # warm-up: compiles
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        hidden = self.model(self.input_ids[:bs], self.positions[:bs])     # [bs, hidden]
                        self.outputs[variant, bs] = self.model.compute_logits(hidden)     # [bs, vocab]
                self.graphs[variant, bs] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured %d CUDA graphs (batch sizes up to %d) in %.1f s",
                    len(self.graphs), self.buckets[-1], time.perf_counter() - start_s)

    def release(self) -> None:
        """Destroys the captured graphs (after the device has finished them). With tensor parallelism
        this comes before the NCCL group is aborted: graphs that captured NCCL kernels keep their
        communicator's resources alive, and NCCL's abort then blocks (measured on two H200s: 10 s and
        more, against half a second without graphs)."""
        torch.cuda.synchronize(self.device)
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def fits(self, num_seqs: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.buckets[-1]

    def bucket(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def run(self, input_ids: np.ndarray | None, positions: np.ndarray, slot_mapping: np.ndarray,
            seq_lens: np.ndarray, block_tables: np.ndarray, *,
            device_input_ids: torch.Tensor | None = None, variant: str = "") -> torch.Tensor:
        """Replay for one decode step of n sequences; returns their logits [n, vocab] (float32).
        The token ids come from the host (`input_ids`) or, already on the device, from `device_input_ids`
        (where -1, a placeholder the sampler left to its full sort and taken back, reads as 0)."""
        n = len(positions)
        bs = self.bucket(n)
        which = self.num_runs % 2
        self.num_runs += 1
        if self.host_copied[which] is not None:
            self.host_copied[which].synchronize()   # returns at once unless that set's copies are still queued
        host = self.host_sets[which]
        if input_ids is not None:
            host["input_ids"][:n].numpy()[:] = input_ids
        host["positions"][:n].numpy()[:] = positions
        host["slot_mapping"][:bs].fill_(-1)
        host["slot_mapping"][:n].numpy()[:] = slot_mapping
        host["seq_lens"][:bs].zero_()
        host["seq_lens"][:n].numpy()[:] = seq_lens
        width = block_tables.shape[1]
        host["block_tables"][:n, :width].numpy()[:] = block_tables
        for name in ("positions", "slot_mapping", "seq_lens"):
            getattr(self, name)[:bs].copy_(host[name][:bs], non_blocking=True)
        if device_input_ids is None:
            self.input_ids[:bs].copy_(host["input_ids"][:bs], non_blocking=True)
        else:   # padding rows keep earlier (valid) token ids; their outputs are dropped
            torch.clamp(device_input_ids, min=0, out=self.input_ids[:n])   # -1: a row taken back later
        self.block_tables[:n, :width].copy_(host["block_tables"][:n, :width], non_blocking=True)
        event = self.host_copied[which] or torch.cuda.Event()
        event.record()
        self.host_copied[which] = event
        self.graphs[variant, bs].replay()
        return self.outputs[variant, bs][:n]
