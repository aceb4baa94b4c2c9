"""Repetition, presence and frequency penalties in one pass over the logits (CUDA).

`logits_processors.apply_repetition_penalty` + `apply_presence_frequency` are seven elementwise
PyTorch operations, each a full pass over `[rows, vocab]` (about 0.5 ms a step for 256 rows of a
151,936-token vocabulary on an H200); this kernel reads the logits, the presence mask and the counts
once and writes the result once, with the same formulas (round-to-nearest division, as PyTorch's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _penalties(x_ptr, out_ptr, seen_ptr, counts_ptr, values_ptr, vocab_size,
               SEEN: tl.constexpr, COUNTS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < vocab_size
    offsets = row.to(tl.int64) * vocab_size + cols
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    if SEEN:  # transformers' repetition penalty: divide a positive logit, multiply a negative one
        penalty = tl.load(values_ptr + row * 3)
        seen = tl.load(seen_ptr + offsets, mask=inside, other=0) != 0
        x = tl.where(seen, tl.where(x < 0, x * penalty, tl.math.div_rn(x, penalty)), x)
        x = tl.minimum(x, 3.4028234663852886e38)  # as the torch path: an overflow stays finite
    if COUNTS:  # OpenAI's: logit -= frequency * count + presence * (count > 0)
        presence = tl.load(values_ptr + row * 3 + 1)
        frequency = tl.load(values_ptr + row * 3 + 2)
        count = tl.load(counts_ptr + offsets, mask=inside, other=0.0)
        x = x - frequency * count
        x = x - presence * (count > 0).to(tl.float32)
    tl.store(out_ptr + offsets, x, mask=inside)


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
                    values: torch.Tensor) -> torch.Tensor:
    """logits: [rows, vocab] float32; seen: [rows, vocab] bool or None; counts: [rows, vocab]
    float32 or None; values: [rows, 3] (repetition penalty, presence, frequency). A new tensor."""
    logits = logits.contiguous()
    rows, vocab_size = logits.shape
    out = torch.empty_like(logits)
    seen_bytes = seen.contiguous().view(torch.uint8) if seen is not None else logits
    counts = counts.contiguous() if counts is not None else logits
    _penalties[(rows, triton.cdiv(vocab_size, BLOCK))](
        logits, out, seen_bytes, counts, values.contiguous(), vocab_size,
        SEEN=seen is not None, COUNTS=counts is not logits, BLOCK=BLOCK)
    return out
