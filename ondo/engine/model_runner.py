"""Turns a SchedulerOutput into one flat token batch, runs the model once, and returns logits.

No padding: the tokens of every scheduled request are concatenated; positions, the slot mapping and
the attention metadata tell the attention layers which tokens belong together.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import numpy as np
import torch

from ondo.engine.forward_context import ForwardContext, set_forward_context
from ondo.engine.scheduler import SchedulerOutput
from ondo.layers.attention import AttentionMetadata


@dataclass
class ModelRunnerOutput:
    sample_logits: torch.Tensor                  # [num_sampling_requests, vocab] float32, in schedule order
    sample_indices: list[int]                    # which scheduled items sample (indices into scheduled)
    prompt_logits: dict[int, torch.Tensor]       # scheduled index -> [num_new_tokens, vocab] for prompt_logprobs


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


class ModelRunner:
    def __init__(self, model: torch.nn.Module, spec: KVCacheSpec, num_blocks: int, block_size: int,
                 device: torch.device, *, enforce_eager: bool = True, max_num_seqs: int = 1,
                 max_model_len: int = 0):
        self.model, self.spec, self.device = model, spec, device
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = _allocate_kv_caches(shape, spec, device)
        self.pin_memory = device.type == "cuda"
        self.backend = None if enforce_eager else _fast_backend(device, spec.dtype)
        self.cuda_graphs = None
        if self.backend is not None:
            from ondo.engine.cuda_graphs import CudaGraphRunner

            self.cuda_graphs = CudaGraphRunner(model, self.kv_caches, self.backend, max_num_seqs,
                                               max_model_len, block_size, device)
            self.cuda_graphs.capture()

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, input_ids: torch.Tensor | None = None) -> ModelRunnerOutput:
        """`input_ids` ([num_scheduled] on the device) is for a decode step launched before its input
        tokens reached the host (see async_decode.py): one token per request, every request samples."""
        if self._graph_step(output):
            return self._run_graph(output, input_ids)
        if input_ids is not None:
            _, positions, meta, sample_rows, sample_indices = self._prepare(output, with_input_ids=False)
        else:
            input_ids, positions, meta, sample_rows, sample_indices = self._prepare(output)
        with set_forward_context(ForwardContext(meta, self.kv_caches, self.backend, self.backend is not None)):
            hidden = self.model(input_ids, positions)                    # [T, hidden]
        prompt_logits = {}
        start = 0
        for i, item in enumerate(output.scheduled):
            if item.request.wants_prompt_logprobs and item.request.num_computed_tokens < item.request.num_prompt_tokens:
                prompt_logits[i] = self.model.compute_logits(hidden[start:start + item.num_new_tokens])
            start += item.num_new_tokens
        sample_logits = self.model.compute_logits(hidden[sample_rows])   # [num_sampling, vocab]
        return ModelRunnerOutput(sample_logits, sample_indices, prompt_logits)

    def _graph_step(self, output: SchedulerOutput) -> bool:
        """Decode-only steps (one token per request) that no prompt_logprobs request needs eager."""
        graphs, n = self.cuda_graphs, len(output.scheduled)
        return (graphs is not None and output.num_batched_tokens == n and graphs.fits(n)
                and not any(s.request.wants_prompt_logprobs and s.request.num_computed_tokens < s.request.num_prompt_tokens
                            for s in output.scheduled))

    def batch_bucket(self, num_seqs: int) -> int:
        """The padded batch size a decode step of `num_seqs` runs at: rows of two decode steps in the same
        bucket are computed by the same kernels, whatever the other rows hold."""
        graphs = self.cuda_graphs
        return graphs.bucket(num_seqs) if graphs is not None and graphs.fits(num_seqs) else num_seqs

    def _run_graph(self, output: SchedulerOutput, device_input_ids: torch.Tensor | None) -> ModelRunnerOutput:
        """A decode-only step (one new token per request) through the captured graphs."""
        n = len(output.scheduled)
        requests = [item.request for item in output.scheduled]
        positions = np.fromiter((r.num_computed_tokens for r in requests), dtype=np.int64, count=n)
        input_ids = None
        if device_input_ids is None:
            # Usually the last sampled token, but a 1-token chunk of a prompt takes that prompt token.
            input_ids = np.fromiter((r.token_ids(r.num_computed_tokens, r.num_computed_tokens + 1)[0]
                                     for r in requests), dtype=np.int64, count=n)
        tables = np.array(_pad([r.block_table for r in requests]), dtype=np.int32)
        block_ids = tables[np.arange(n), positions // self.block_size]
        slot_mapping = block_ids.astype(np.int64) * self.block_size + positions % self.block_size
        logits = self.cuda_graphs.run(input_ids, positions, slot_mapping, (positions + 1).astype(np.int32), tables,
                                      device_input_ids=device_input_ids)
        if device_input_ids is not None:
            return ModelRunnerOutput(logits, list(range(n)), {})
        sample_indices = [i for i, item in enumerate(output.scheduled) if item.samples]
        if len(sample_indices) < n:   # a 1-token prompt chunk among the decodes samples nothing
            logits = logits[self.to_device(np.array(sample_indices, dtype=np.int64))]
        return ModelRunnerOutput(logits, sample_indices, {})

    def _prepare(self, output: SchedulerOutput, with_input_ids: bool = True):
        """Flat inputs and metadata; without `with_input_ids` the token ids are left to the caller and every
        request samples (a decode step launched ahead of its input tokens)."""
        scheduled = output.scheduled
        num_tokens = output.num_batched_tokens
        input_ids = np.empty(num_tokens, dtype=np.int64)
        positions = np.empty(num_tokens, dtype=np.int64)
        query_lens, seq_lens, tables = [], [], []
        sample_rows, sample_indices = [], []
        start = 0
        for i, item in enumerate(scheduled):
            request, n = item.request, item.num_new_tokens
            first = request.num_computed_tokens
            if with_input_ids:
                input_ids[start:start + n] = request.token_ids(first, first + n)
            positions[start:start + n] = np.arange(first, first + n)
            query_lens.append(n)
            seq_lens.append(first + n)
            tables.append(request.block_table)
            if item.samples or not with_input_ids:
                sample_rows.append(start + n - 1)
                sample_indices.append(i)
            start += n
        table_array = np.array(tables[0] if len(tables) == 1 else _pad(tables), dtype=np.int32).reshape(len(tables), -1)
        block_ids = table_array[np.repeat(np.arange(len(tables)), query_lens), positions // self.block_size]
        slot_mapping = block_ids.astype(np.int64) * self.block_size + positions % self.block_size
        query_start_loc = np.zeros(len(scheduled) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start_loc[1:])
        meta = AttentionMetadata(
            slot_mapping=self.to_device(slot_mapping),
            query_start_loc=self.to_device(query_start_loc),
            seq_lens=self.to_device(np.array(seq_lens, dtype=np.int32)),
            block_tables=self.to_device(table_array),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
            is_decode=max(query_lens) == 1)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.to_device(input_ids), self.to_device(positions), meta, rows, sample_indices

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor
        if self.pin_memory:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)


def _fast_backend(device: torch.device, dtype: torch.dtype):
    """The Triton backend on a CUDA GPU in half precision; None (portable path) elsewhere."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    from ondo.layers.attention import triton_backend

    return triton_backend.TritonAttentionBackend() if triton_backend.is_available() else None


def _pad(tables: list[list[int]]) -> list[list[int]]:
    width = max(len(t) for t in tables)
    return [t + [0] * (width - len(t)) for t in tables]


def _allocate_kv_caches(shape: tuple[int, ...], spec: KVCacheSpec, device: torch.device) -> list[torch.Tensor]:
    """One zeroed cache tensor per layer. On the CPU they are views of one anonymous memory map: its
    pages read as zeros and are committed only when first written, so the budget is an upper bound
    on resident memory, not a reservation (the block manager hands out used blocks first)."""
    if device.type != "cpu":
        return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
    per_layer = math.prod(shape)
    buffer = mmap.mmap(-1, per_layer * spec.num_layers * spec.dtype.itemsize)
    flat = torch.frombuffer(buffer, dtype=spec.dtype)
    return [flat[i * per_layer:(i + 1) * per_layer].view(shape) for i in range(spec.num_layers)]
