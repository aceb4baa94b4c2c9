"""The candidates' rules and the draw in one Triton kernel per step (CUDA).

`candidates.select_candidates` + `draw_candidates` cost some fifty small PyTorch operations per step;
for one stream their launches cost more than the model's decode step leaves room for. Here `topk`
(replayed from a CUDA graph for a few rows, `graphed_topk`) and the noise stay PyTorch operations,
and one kernel (one program per row) divides the candidates by the temperature, sorts them as the
reference's stable sort orders them, and runs top_k -> top_p -> min_p, the proof that the budget
holds the kept set, and the exponential race.
It follows `candidates.py` rule for rule; tests/sample/test_sampler_gpu.py compares the two.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import triton
import triton.language as tl

from ondo.sample.candidates import candidate_noise, prepare_candidates
from ondo.sample.fast_launch import FastLaunch
from ondo.sample.graphed_topk import graphed_topk


@triton.jit
def _sorted_as_the_reference(v, ids):
    """v [K] float32 and their token ids, sorted by value descending, equal values in token-id order (the
    reference's stable sort): one sort of 64-bit keys, the value's bits (mapped so that integer order is
    float order) above (2^32 - 1 - id)."""
    low_bits: tl.constexpr = 4294967295
    bits = v.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)   # negative floats: larger magnitude, smaller integer
    keys = tl.sort((ordered.to(tl.int64) << 32) | (low_bits - ids.to(tl.int64)), descending=True)
    ordered = (keys >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), low_bits - (keys & low_bits)


@triton.jit
def _decide_and_draw(values_ptr, ids_ptr, options_ptr, lse_ptr, noise_ptr, out_ptr,
                     K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr):
    row = tl.program_id(0)
    pos = tl.arange(0, K)
    neg_inf = float("-inf")
    v = tl.load(values_ptr + row * K + pos)  # [K] raw logits as topk left them (prepare_candidates(sort=False))
    ids = tl.load(ids_ptr + row * K + pos)
    # rounded as candidates.py's `values / temperature` (a temperature of 1 divides exactly)
    v = tl.math.div_rn(v, tl.load(options_ptr + row * 6 + 4))
    v, ids = _sorted_as_the_reference(v, ids)   # descending, temperature applied
    # options: [rows, 6] budget, top_k, top_p, min_p, temperature, has_top_k (candidates.Prepared)
    budget = tl.load(options_ptr + row * 6).to(tl.int32)
    k = tl.load(options_ptr + row * 6 + 1).to(tl.int32)
    top_p = tl.load(options_ptr + row * 6 + 2)
    min_p = tl.load(options_ptr + row * 6 + 3)
    has_top_k = tl.load(options_ptr + row * 6 + 5) > 0

    keep = (pos < budget) & (v > neg_inf)
    kth = tl.max(tl.where(pos == k - 1, v, neg_inf), axis=0)
    kth = tl.where(has_top_k, kth, neg_inf)
    keep = keep & (v >= kth)
    if TOP_P:
        masked = tl.where(keep, v, neg_inf)
        top = tl.max(masked, axis=0)
        norm = top + tl.log(tl.sum(tl.exp(masked - top), axis=0))
        norm = tl.where(has_top_k, norm, tl.load(lse_ptr + row))
        probs = tl.exp(masked - norm)
        tail = tl.cumsum(probs, axis=0, reverse=True)
        beyond = tl.where(has_top_k, 0.0, tl.maximum(1.0 - tl.sum(probs, axis=0), 0.0))
        drop = ((tail + beyond) <= (1 - top_p)) & (pos > 0)
        keep = keep & (drop == 0)
    if MIN_P:
        masked = tl.where(keep, v, neg_inf)
        weights = tl.exp(masked - tl.max(masked, axis=0))
        probs = weights / tl.sum(weights, axis=0)
        keep = keep & (probs >= min_p * tl.max(probs, axis=0))
    kept = tl.maximum(tl.sum(keep.to(tl.int32), axis=0), 1)
    last_kept = tl.max(tl.where(pos == kept - 1, v, neg_inf), axis=0)
    budget_end = tl.max(tl.where(pos == budget - 1, v, neg_inf), axis=0)
    flagged = (last_kept <= budget_end) | (has_top_k & (budget_end >= kth) & (budget_end > neg_inf))

    final = tl.where(keep, v, neg_inf)
    weights = tl.exp(final - tl.max(final, axis=0))
    noise = tl.maximum(tl.load(noise_ptr + row * K + pos), 1.1754943508222875e-38)
    choice = tl.argmax(weights / noise, axis=0)
    token = tl.sum(tl.where(pos == choice, ids, 0), axis=0)
    tl.store(out_ptr + row, tl.where(flagged, -1, token))


_launch_decide_and_draw = FastLaunch(_decide_and_draw)


def sample_candidates(logits: torch.Tensor, params: Sequence[Any], budgets: Sequence[int],
                      generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """[rows] token ids, -1 where the full sort must decide: `draw_candidates(select_candidates(...))`
    with the rules and the draw fused."""
    # the kernel reads the graphed topk's buffers on this stream, before the next step replays it
    prepared = prepare_candidates(logits, params, budgets, sort=False, topk=graphed_topk)
    rows, width = prepared.values.shape
    noise = candidate_noise(prepared.values, budgets, generators)  # [rows, K]
    lse = prepared.full_lse if prepared.full_lse is not None else prepared.values[:, 0]  # unused then
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    _launch_decide_and_draw((rows,), prepared.values.contiguous(), prepared.token_ids.contiguous(),
                            prepared.options.contiguous(), lse.contiguous(), noise, out, K=width,
                            TOP_P=prepared.uses_top_p, MIN_P=prepared.uses_min_p,
                            num_warps=4 if width <= 256 else 8)
    return out

