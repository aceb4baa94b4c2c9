"""`topk` of a few long rows, replayed from a CUDA graph.

`torch.topk` of one 151,936-entry row takes PyTorch's multi-block radix select: about a dozen kernel
launches and ~130 us of host time a call (H200 host), while a one-stream decode step of a small model
takes ~0.9 ms on the GPU. Launching its kernels costs more host time than they take on the device,
so for a few rows the same operations are captured once per shape and replayed: a copy into the
graph's input and one graph launch a step. Many rows keep the eager call: there the kernels'
device time dominates and the graph would only add the copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ondo.sample.candidates import unsorted_topk

# Up to this many rows a step is host-bound on its topk launches (one stream, a few streams).
MAX_GRAPHED_ROWS = 8


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor   # [rows, vocab] the graph's input
    values: torch.Tensor   # [rows, width] its outputs, overwritten by the next replay
    token_ids: torch.Tensor


class GraphedTopK:
    def __init__(self) -> None:
        self._captured: dict[tuple, _Captured] = {}

    def __call__(self, logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`unsorted_topk(logits, width)`. From a graph the results live in buffers that
        the next call with the same shape overwrites: read them on this stream before then."""
        if (not logits.is_cuda or logits.dim() != 2 or logits.shape[0] > MAX_GRAPHED_ROWS
                or torch.cuda.is_current_stream_capturing()):
            return unsorted_topk(logits, width)
        key = (tuple(logits.shape), logits.dtype, logits.device, width)
        captured = self._captured.get(key)
        if captured is None:
            captured = self._captured[key] = _capture(logits, width)
        captured.logits.copy_(logits)
        captured.graph.replay()
        return captured.values, captured.token_ids


def _capture(like: torch.Tensor, width: int) -> _Captured:
    logits = torch.empty_like(like, memory_format=torch.contiguous_format)
    logits.copy_(like)
    side = torch.cuda.Stream(like.device)
    side.wait_stream(torch.cuda.current_stream(like.device))
    with torch.cuda.stream(side):  # first calls outside the capture: lazy initialisation
        for _ in range(2):
            unsorted_topk(logits, width)
    torch.cuda.current_stream(like.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread of the engine reading tokens back must not break the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        values, token_ids = unsorted_topk(logits, width)
    return _Captured(graph, logits, values, token_ids)


graphed_topk = GraphedTopK()
