"""Turns a SchedulerOutput into one flat token batch, runs the model once, and returns logits.

Two halves: `prepare` (host) turns the schedule into a `StepInput` of plain arrays, `run` (device)
executes one: graph replay or eager forward, then logits selection. With tensor parallelism rank 0
prepares once and every rank runs the same StepInput.

No padding: the tokens of every scheduled request are concatenated; positions, the slot mapping and
the attention metadata tell the attention layers which tokens belong together.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ondo.distributed.parallel_state import broadcast_from_first, tp_size
from ondo.engine.forward_context import ForwardContext, set_forward_context
from ondo.engine.scheduler import SchedulerOutput
from ondo.layers.attention import AttentionMetadata


@dataclass
class ModelRunnerOutput:
    sample_logits: torch.Tensor                  # [num_sampling_requests, vocab] float32, in schedule order
    sample_indices: list[int]                    # which scheduled items sample (indices into scheduled)
    prompt_logits: dict[int, torch.Tensor]       # scheduled index -> [num_new_tokens, vocab] for prompt_logprobs


@dataclass
class StepInput:
    """One step's inputs as plain data (numpy arrays, ints, lists): what the host prepares from a
    SchedulerOutput and a device executes. Nothing here refers to a Request, so it can be pickled and
    sent to the other tensor-parallel ranks (or another process) as it is."""
    positions: np.ndarray          # [T] int64: absolute position of each new token
    slot_mapping: np.ndarray       # [T] int64: cache slot each new token's K/V goes to
    query_start_loc: np.ndarray    # [S + 1] int32: seq i's tokens are rows [qsl[i], qsl[i+1])
    seq_lens: np.ndarray           # [S] int32: tokens of each sequence after this step
    block_tables: np.ndarray       # [S, max_blocks] int32, padded with 0
    sample_rows: np.ndarray        # [num_sampling] int64: token rows whose logits are sampled
    sample_indices: list[int]      # scheduled index of each sampled row
    prompt_logits_rows: list[tuple[int, int, int]]   # (scheduled index, first row, end row) for prompt_logprobs
    max_query_len: int
    max_seq_len: int
    is_decode: bool                # every sequence has exactly one new token
    use_graph: bool                # replay a captured CUDA graph (decode only)
    input_ids: np.ndarray | None = None   # [T] int64 (0 at placeholder rows)
    lora_slots: np.ndarray | None = None  # [S] int32 adapter slot per sequence; None = no adapters
    # Token rows whose id is a placeholder: sampled by the previous step on rank 0's device, not read
    # back yet (async scheduling); `placeholder_sources` are their rows in that step's token tensor.
    placeholder_rows: np.ndarray | None = None     # [P] int64, ascending
    placeholder_sources: np.ndarray | None = None  # [P] int64

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


class StepSender(Protocol):
    def __call__(self, step: StepInput) -> None: ...
    def step_failed(self, error: BaseException) -> None: ...


@dataclass
class InFlightTokens:
    """Tokens a step sampled on the device that the host has not read yet: the input ids of the
    placeholders (Request.num_output_placeholders) a following step computes."""
    # [rows] int64 on the device; -1 for a row the sampler left to its full sort (its placeholder is
    # taken back when it lands): the model runner reads it as token 0
    token_ids: torch.Tensor
    row_of: dict                     # Request -> its row in token_ids


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int              # of this rank (the whole model's at tensor_parallel_size 1)
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


class ModelRunner:
    def __init__(self, model: torch.nn.Module, spec: KVCacheSpec, num_blocks: int, block_size: int,
                 device: torch.device, *, enforce_eager: bool = True, max_num_seqs: int = 1,
                 max_model_len: int = 0, lora_manager=None):
        self.model, self.spec, self.device = model, spec, device
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = _allocate_kv_caches(shape, spec, device)
        self.pin_memory = device.type == "cuda"
        self.backend = None if enforce_eager else _fast_backend(device, spec.dtype)
        self.enforce_eager = enforce_eager   # also keeps a CPU decode step's layers eager (no C stack)
        # With tensor parallelism: hands each step's StepInput to the other ranks before it runs here
        # (`sender(step)`), and hears of a step that failed here (`sender.step_failed(error)`).
        self.step_sender: StepSender | None = None
        self.cuda_graphs = None
        self.lora_manager = lora_manager   # with enable_lora: writes each token's adapter slot every step
        if self.backend is not None:
            from ondo.engine.cuda_graphs import CudaGraphRunner

            variants = lora_manager.graph_variants() if lora_manager is not None else None
            self.cuda_graphs = CudaGraphRunner(model, self.kv_caches, self.backend, max_num_seqs,
                                               max_model_len, block_size, device, variants)
            self.cuda_graphs.capture()

    def release_cuda_graphs(self) -> None:
        """At shutdown: later steps (none are expected) run eagerly."""
        if self.cuda_graphs is not None:
            self.cuda_graphs.release()
            self.cuda_graphs = None

    def execute(self, output: SchedulerOutput, in_flight: InFlightTokens | None = None) -> ModelRunnerOutput:
        """Launch one step's forward. `in_flight` holds the ids of the placeholders it computes (async
        scheduling: tokens of the previous step not read back yet)."""
        if self.lora_manager is not None:
            self.lora_manager.prepare(output)
        step = self.prepare(output, in_flight.row_of if in_flight is not None else None)
        tokens = in_flight.token_ids if in_flight is not None else None
        if self.step_sender is None:
            return self.run(step, tokens)
        self.step_sender(step)
        try:
            return self.run(step, tokens)
        except BaseException as error:
            self.step_sender.step_failed(error)
            raise

    # ---- host side: SchedulerOutput -> StepInput -------------------------------------------------

    def prepare(self, output: SchedulerOutput, in_flight_rows: dict | None = None) -> StepInput:
        """The step's plain inputs. A token past a request's known ones is a placeholder: its id is the
        row `in_flight_rows[request]` of the tokens the previous step sampled on the device."""
        placeholders = Placeholders(in_flight_rows)
        if self._graph_step(output):
            step = self._prepare_decode(output, placeholders)
        else:
            step = self._prepare_flat(output, placeholders)
        step.placeholder_rows, step.placeholder_sources = placeholders.arrays()
        return step

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

    def _prepare_decode(self, output: SchedulerOutput, placeholders: Placeholders) -> StepInput:
        """A decode-only step (one new token per request) for the captured graphs."""
        n = len(output.scheduled)
        requests = [item.request for item in output.scheduled]
        positions = np.fromiter((r.num_computed_tokens for r in requests), dtype=np.int64, count=n)
        # Usually the last sampled token (a placeholder while it is in flight), but a 1-token chunk of a
        # prompt takes that prompt token.
        input_ids = np.fromiter((placeholders.token(r, r.num_computed_tokens, i) for i, r in enumerate(requests)),
                                dtype=np.int64, count=n)
        tables = np.array(_pad([r.block_table for r in requests]), dtype=np.int32)
        block_ids = tables[np.arange(n), positions // self.block_size]
        slot_mapping = block_ids.astype(np.int64) * self.block_size + positions % self.block_size
        sample_indices = [i for i, item in enumerate(output.scheduled) if item.samples]
        seq_lens = (positions + 1).astype(np.int32)
        return StepInput(positions, slot_mapping, np.arange(n + 1, dtype=np.int32), seq_lens, tables,
                         np.array(sample_indices, dtype=np.int64), sample_indices, [], 1, int(seq_lens.max()),
                         is_decode=True, use_graph=True, input_ids=input_ids)

    def _prepare_flat(self, output: SchedulerOutput, placeholders: Placeholders) -> StepInput:
        scheduled = output.scheduled
        num_tokens = output.num_batched_tokens
        input_ids = np.empty(num_tokens, dtype=np.int64)
        positions = np.empty(num_tokens, dtype=np.int64)
        query_lens, seq_lens, tables = [], [], []
        sample_rows, sample_indices, prompt_rows = [], [], []
        start = 0
        for i, item in enumerate(scheduled):
            request, n = item.request, item.num_new_tokens
            first = request.num_computed_tokens
            if first + n <= request.num_tokens:
                input_ids[start:start + n] = request.token_ids(first, first + n)
            else:   # only a decoding request has a placeholder, and then it is its one new token
                input_ids[start] = placeholders.token(request, first, start)
            positions[start:start + n] = np.arange(first, first + n)
            query_lens.append(n)
            seq_lens.append(first + n)
            tables.append(request.block_table)
            if request.wants_prompt_logprobs and first < request.num_prompt_tokens:
                prompt_rows.append((i, start, start + n))
            if item.samples:
                sample_rows.append(start + n - 1)
                sample_indices.append(i)
            start += n
        table_array = np.array(tables[0] if len(tables) == 1 else _pad(tables), dtype=np.int32).reshape(len(tables), -1)
        block_ids = table_array[np.repeat(np.arange(len(tables)), query_lens), positions // self.block_size]
        slot_mapping = block_ids.astype(np.int64) * self.block_size + positions % self.block_size
        query_start_loc = np.zeros(len(scheduled) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start_loc[1:])
        max_query_len = max(query_lens)
        return StepInput(positions, slot_mapping, query_start_loc, np.array(seq_lens, dtype=np.int32), table_array,
                         np.array(sample_rows, dtype=np.int64), sample_indices, prompt_rows, max_query_len,
                         max(seq_lens), is_decode=max_query_len == 1, use_graph=False, input_ids=input_ids)

    # ---- device side: StepInput -> logits ---------------------------------------------------------

    @torch.inference_mode()
    def run(self, step: StepInput, in_flight_tokens: torch.Tensor | None = None) -> ModelRunnerOutput:
        """The forward of one step (graph replay or eager) and the logits of its sampled rows. Every
        tensor-parallel rank runs this with the same `step`, so the collectives inside match.
        in_flight_tokens: the previous step's sampled tokens (rank 0 only), for the placeholder rows."""
        device_input_ids = None
        if step.placeholder_rows is not None:
            device_input_ids = self._input_ids_with_placeholders(step, in_flight_tokens)
        if step.use_graph:
            n = len(step.positions)
            variant = self.lora_manager.step_variant() if self.lora_manager is not None else ""
            logits = self.cuda_graphs.run(step.input_ids, step.positions, step.slot_mapping, step.seq_lens,
                                          step.block_tables, device_input_ids=device_input_ids, variant=variant)
            if len(step.sample_indices) < n:   # a 1-token prompt chunk among the decodes samples nothing
                logits = logits[self.to_device(step.sample_rows)]
            return ModelRunnerOutput(logits, step.sample_indices, {})
        input_ids, positions, meta = self.device_inputs(step, device_input_ids)
        with set_forward_context(ForwardContext(meta, self.kv_caches, self.backend, self.backend is not None,
                                                cpu_decode_stack=not self.enforce_eager)):
            hidden = self.model(input_ids, positions)                        # [T, hidden]
        prompt_logits = {i: self.model.compute_logits(hidden[start:end]) for i, start, end in step.prompt_logits_rows}
        rows = self.to_device(step.sample_rows)
        sample_logits = self.model.compute_logits(hidden[rows])               # [num_sampling, vocab]
        return ModelRunnerOutput(sample_logits, step.sample_indices, prompt_logits)

    def _input_ids_with_placeholders(self, step: StepInput, in_flight_tokens: torch.Tensor | None) -> torch.Tensor:
        """[T] input ids on the device: the host's, with the placeholder rows taken from the tokens the
        previous step sampled (on rank 0's device; broadcast to the other tensor-parallel ranks)."""
        rows, sources = step.placeholder_rows, step.placeholder_sources
        values = None
        if in_flight_tokens is not None:   # rank 0
            identity = len(sources) <= len(in_flight_tokens) and bool((sources == np.arange(len(sources))).all())
            values = in_flight_tokens[:len(sources)] if identity else in_flight_tokens[self.to_device(sources)]
        if tp_size() > 1:
            values = broadcast_from_first(values, len(rows), torch.int64, self.device)
        if len(rows) == step.num_tokens and step.use_graph:   # every token in flight (rows ascending: 0..T-1)
            return values   # the graph's input copy reads a -1 as 0 (no extra launch: a one-stream step's host time counts)
        values = values.clamp(min=0)
        if len(rows) == step.num_tokens:
            return values
        input_ids = self.to_device(step.input_ids)
        return input_ids.index_copy_(0, self.to_device(rows), values)

    def device_inputs(self, step: StepInput, device_input_ids: torch.Tensor | None = None):
        """(input_ids [T], positions [T], AttentionMetadata) of an eager step, on the device."""
        input_ids = device_input_ids if device_input_ids is not None else self.to_device(step.input_ids)
        qsl = step.query_start_loc
        meta = AttentionMetadata(
            slot_mapping=self.to_device(step.slot_mapping),
            query_start_loc=self.to_device(qsl),
            seq_lens=self.to_device(step.seq_lens),
            block_tables=self.to_device(step.block_tables),
            max_query_len=step.max_query_len, max_seq_len=step.max_seq_len,
            query_lens_cpu=(qsl[1:] - qsl[:-1]).tolist(), seq_lens_cpu=step.seq_lens.tolist(),
            is_decode=step.is_decode)
        return input_ids, self.to_device(step.positions), meta

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor
        if self.pin_memory:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)


class Placeholders:
    """Collects a step's placeholder rows while its input ids are prepared (see `ModelRunner.prepare`)."""

    def __init__(self, in_flight_rows: dict | None):
        self.in_flight_rows = in_flight_rows
        self.rows: list[int] = []
        self.sources: list[int] = []

    def token(self, request, position: int, row: int) -> int:
        """The id of `request`'s token at `position`, computed at token row `row`: known on the host, or
        a placeholder (0 here; its id comes from the device)."""
        if position < request.num_tokens:
            return request.token_ids(position, position + 1)[0]
        if self.in_flight_rows is None or request not in self.in_flight_rows:
            raise RuntimeError(f"request {request.request_id!r}: token {position} is neither known nor in flight")
        self.rows.append(row)
        self.sources.append(self.in_flight_rows[request])
        return 0

    def arrays(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not self.rows:
            return None, None
        return np.array(self.rows, dtype=np.int64), np.array(self.sources, dtype=np.int64)


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
