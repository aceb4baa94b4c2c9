"""top_k / top_p / min_p without sorting the vocabulary: decide among the most likely tokens.

The reference (`logits_processors.apply_top_k_top_p`, transformers' warpers) sorts the whole
vocabulary of every row -- 151,936 entries x 256 rows per step -- although top-k and top-p keep only
the head of the distribution. Here each row gets a candidate budget (`candidate_budget`: a margin
over its top_k, or `TOP_P_CANDIDATES` for a top_p alone), one `topk` over the batch takes the largest
budget, and the same rules run on the candidates:

- top_k keeps every token >= the k-th largest logit (ties included), as the reference;
- top_p drops, in the order of the reference's stable sort (logit descending, then token id
  ascending), the tokens whose mass and that of all less likely ones is <= 1 - top_p; the mass is
  taken against the whole vocabulary (top_p alone) or the top-k set (with top_k);
- min_p drops the kept tokens whose renormalised probability is < min_p x the largest.

The result is exact -- the reference's kept set and renormalised probabilities -- whenever the last
kept token's group of equal logits ends before the end of the row's budget, which proves that
nothing past the budget would be kept. Otherwise (a top_p nucleus wider than the budget, top-k ties
running past it) the row is flagged and the sampler redoes it with the full sort. A row's outcome and
its generator's draws depend on its own logits and options only, never on the batch's budget, so
seeded requests stay reproducible in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ondo.sample.per_batch import derived

NEG_INF = float("-inf")
# The candidates of a row with top_p and no top_k: wide enough for the nucleus of a typical
# language-model step; a wider nucleus falls back to the full sort.
TOP_P_CANDIDATES = 1024
# Budget for top_k: the next power of two >= 2 x top_k, so that ties at the k-th logit rarely
# reach the budget's end (bf16 logits tie often).
MIN_TOP_K_BUDGET = 64
# Past this fraction of the vocabulary a full sort costs no more than topk.
MAX_BUDGET_FRACTION = 0.25


def candidate_budget(params: Any, vocab_size: int) -> int | None:
    """How many of the most likely tokens decide the row; None when the row must take the
    reference path (no top_k / top_p, an option the candidates do not cover, or a budget close to
    the vocabulary)."""
    if params.typical_p < 1.0 or params.epsilon_cutoff > 0 or params.eta_cutoff > 0:
        return None
    if 0 < params.top_k < vocab_size:
        budget = max(MIN_TOP_K_BUDGET, 1 << (2 * params.top_k - 1).bit_length())
    elif params.top_p < 1.0:
        budget = TOP_P_CANDIDATES
    else:
        return None  # temperature / min_p only: elementwise on the vocabulary, no sort to avoid
    return budget if budget <= MAX_BUDGET_FRACTION * vocab_size else None


@dataclass
class Candidates:
    logits: torch.Tensor  # [rows, K] kept candidates' logits, most likely first; -inf = dropped
    token_ids: torch.Tensor  # [rows, K] their token ids
    needs_full_sort: torch.Tensor  # [rows] bool: the budget could not prove the kept set
    budgets: list[int]  # each row's own budget (host)


@dataclass
class Prepared:
    """The candidates before the rules: `topk` over the batch's largest budget, re-sorted stably."""
    values: torch.Tensor  # [rows, K] descending, ties in token-id order, temperature applied
    # (with prepare_candidates(sort=False): the raw logits as topk returns them, in no set order)
    token_ids: torch.Tensor  # [rows, K]
    options: torch.Tensor  # [rows, 6] float32: budget, top_k, top_p, min_p, temperature, has_top_k
    full_lse: torch.Tensor | None  # [rows] logsumexp of the whole (divided) row; None if no row
    # has top_p without top_k (the only rule that measures mass against the whole vocabulary)
    uses_top_p: bool  # a row has top_p < 1
    uses_min_p: bool  # a row has min_p > 0


def _options(params: Sequence[Any], budgets: Sequence[int], vocab_size: int,
             device: torch.device) -> tuple[torch.Tensor, bool, bool, bool, bool]:
    """[rows, 6] options on the device; whether a row has top_p without top_k; whether a row divides
    by a temperature; whether a row has top_p, min_p."""
    width = max(budgets)
    with_top_k = [0 < p.top_k < vocab_size for p in params]
    top_k = [p.top_k if has else width for p, has in zip(params, with_top_k)]
    columns = [[float(b), float(k), float(p.top_p), float(p.min_p), float(p.temperature), float(has)]
               for b, k, p, has in zip(budgets, top_k, params, with_top_k)]
    options = torch.tensor(columns, dtype=torch.float32).to(device, non_blocking=True)  # [rows, 6]
    without_top_k = any(p.top_p < 1.0 and not has for p, has in zip(params, with_top_k))
    return (options, without_top_k, any(p.temperature != 1.0 for p in params), any(p.top_p < 1.0 for p in params),
            any(p.min_p > 0 for p in params))


def unsorted_topk(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) [rows, width] of the `width` largest logits of each row, in no set order."""
    return logits.topk(width, dim=-1, sorted=False)


def prepare_candidates(logits: torch.Tensor, params: Sequence[Any], budgets: Sequence[int],
                       sort: bool = True, topk: Callable = unsorted_topk) -> Prepared:
    """sort=False leaves the division by the temperature and the stable re-sort to the caller (the fused
    CUDA kernel does both in registers, five PyTorch operations fewer a step). `topk` has
    `unsorted_topk`'s contract (`graphed_topk` replays it from a CUDA graph)."""
    rows, vocab_size = logits.shape
    width = max(budgets)
    # The budgets derive from the params and vocab_size too: the same params, the same options.
    options, without_top_k, divided, uses_top_p, uses_min_p = derived(
        ("candidate options", vocab_size, logits.device), params,
        lambda: _options(params, budgets, vocab_size, logits.device))
    temperature = options[:, 4:5] if divided else None  # [rows, 1]

    # Dividing by a temperature keeps the order (at most it makes ties), so the candidates are
    # taken on the raw logits and only they are divided.
    values, token_ids = topk(logits, width)  # [rows, K], in no set order
    if sort:
        # The reference's stable sort puts equal logits in token-id order: sort by id, then stably
        # by value, so that a tie group cut by top_p keeps the same tokens.
        token_ids, by_id = token_ids.sort(dim=-1)
        values = values.gather(1, by_id)
        if divided:
            values = values / temperature
        values, by_value = values.sort(dim=-1, descending=True, stable=True)
        token_ids = token_ids.gather(1, by_value)
    full_lse = None
    if without_top_k:  # top_p alone measures mass against the whole (divided) vocabulary
        full_lse = (logits / temperature if divided else logits).logsumexp(dim=-1)  # [rows]
    return Prepared(values, token_ids, options, full_lse, uses_top_p, uses_min_p)


def select_candidates(logits: torch.Tensor, params: Sequence[Any], budgets: Sequence[int]) -> Candidates:
    """temperature -> top_k -> top_p -> min_p on the candidates. logits: [rows, vocab], before
    temperature; budgets: `candidate_budget` of each row (none None)."""
    prepared = prepare_candidates(logits, params, budgets)
    values = prepared.values
    budget, k, top_p, min_p, _, has_top_k = prepared.options.unbind(1)  # [rows] each
    has_top_k = has_top_k > 0
    position = torch.arange(values.shape[1], device=values.device)  # [K]
    # -inf candidates (tokens a processor banned) have probability 0 in the reference too.
    keep = (position < budget[:, None]) & (values > NEG_INF)  # [rows, K]
    kth = values.gather(1, (k.long() - 1)[:, None])  # [rows, 1]
    kth = torch.where(has_top_k[:, None], kth, NEG_INF)
    keep &= values >= kth
    if prepared.uses_top_p:
        keep = _top_p(values, keep, has_top_k, top_p, prepared.full_lse)
    if prepared.uses_min_p:
        probs = values.masked_fill(~keep, NEG_INF).softmax(dim=-1)  # [rows, K]
        keep &= probs >= min_p[:, None] * probs[:, :1]
    kept = keep.sum(dim=-1, keepdim=True).clamp(min=1)  # [rows, 1]; keep is a prefix
    last_kept = values.gather(1, kept - 1)  # [rows, 1]
    budget_end = values.gather(1, (budget.long() - 1)[:, None])  # [rows, 1]
    # Proof that nothing past the budget matters fails when the last kept logit's tie group
    # reaches the budget's end (more of the kept set, or of the group whose token-id order
    # decides who is kept, may lie beyond), or when top_k's ties do (the top-k set that top_p
    # and min_p normalise over would be incomplete). Values descend, so `<=` / `>=` mean equal.
    # A budget ending at -inf holds every finite logit: nothing past it has any probability.
    top_k_past_budget = has_top_k[:, None] & (budget_end >= kth) & (budget_end > NEG_INF)  # [rows, 1]
    tie_past_budget = (last_kept <= budget_end) | top_k_past_budget  # [rows, 1]
    return Candidates(values.masked_fill(~keep, NEG_INF), prepared.token_ids, tie_past_budget[:, 0],
                      list(budgets))


def _top_p(values: torch.Tensor, keep: torch.Tensor, has_top_k: torch.Tensor, top_p: torch.Tensor,
           full_lse: torch.Tensor | None) -> torch.Tensor:
    """The reference's rule: drop a token when its mass plus that of every less likely token is
    <= 1 - top_p; the most likely token stays."""
    masked = values.masked_fill(~keep, NEG_INF)  # [rows, K]
    # With top_k the kept set lies within the candidates (else the row is flagged): normalise over
    # them. Without, the mass is a share of the whole vocabulary.
    norm = masked.logsumexp(dim=-1, keepdim=True)  # [rows, 1]
    if full_lse is not None:
        norm = torch.where(has_top_k[:, None], norm, full_lse[:, None])
    probs = (masked - norm).exp()  # [rows, K]
    # Summed from the least likely candidate up, as the reference, plus the mass beyond the
    # candidates (nothing with top_k).
    tail = probs.flip(-1).cumsum(dim=-1).flip(-1)  # [rows, K]
    if full_lse is not None:
        beyond = torch.where(has_top_k, 0.0, (1.0 - probs.sum(dim=-1)).clamp(min=0.0))  # [rows]
        tail = tail + beyond[:, None]
    drop = tail <= (1 - top_p)[:, None]
    drop[:, 0] = False
    return keep & ~drop


def draw_candidates(candidates: Candidates, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row from softmax(candidates.logits), by exponential race. Flagged rows get -1."""
    logits = candidates.logits
    weights = (logits - logits[:, :1]).exp()  # [rows, K]: probabilities up to each row's scale
    noise = candidate_noise(weights, candidates.budgets, generators)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # an Exp(1) draw can be exactly 0
    choice = (weights / noise).argmax(dim=-1, keepdim=True)  # [rows, 1]
    token_ids = candidates.token_ids.gather(1, choice)[:, 0]  # [rows]
    return token_ids.masked_fill(candidates.needs_full_sort, -1)


def candidate_noise(like: torch.Tensor, budgets: Sequence[int],
                    generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """[rows, K] Exp(1) draws. A seeded row draws exactly its own budget from its generator,
    whatever the batch's width; its other columns (weight 0) get 1."""
    noise = torch.empty_like(like, dtype=torch.float32)  # [rows, K]
    seeded = [(row, generator) for row, generator in enumerate(generators) if generator is not None]
    if len(seeded) < len(generators):
        noise.exponential_()
    else:
        noise.fill_(1.0)
    for row, generator in seeded:
        budget = budgets[row]
        if generator.device.type == noise.device.type:
            noise[row, :budget].exponential_(generator=generator)
        else:  # a host generator for device logits: draw on its device, then copy
            draws = torch.empty(budget, device=generator.device)
            noise[row, :budget].copy_(draws.exponential_(generator=generator))
    return noise


def keep_mask(candidates: Candidates, vocab_size: int) -> torch.Tensor:
    """The candidates' kept logits at their places in a `[rows, vocab]` tensor, -inf elsewhere
    (for tests and checks: the fast path never builds it)."""
    full = torch.full((candidates.logits.shape[0], vocab_size), NEG_INF,
                      dtype=candidates.logits.dtype, device=candidates.logits.device)
    return full.scatter_(1, candidates.token_ids, candidates.logits)
