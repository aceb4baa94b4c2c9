"""Batched logits processors: each works on a whole batch `[rows, vocab]` with per-row parameter
tensors, stays on the logits' device and never reads a value back to the host.

Each one matches its transformers counterpart (named in its docstring) row by row; tests compare
them on random logits. Filtered-out tokens get -inf, as in transformers. Token histories arrive
padded; the pad values are chosen so that they never match a real token id:

- `padded_right(..., pad=vocab)`: scattered into a `[rows, vocab + 1]` buffer whose last column
  is dropped afterwards (penalties);
- `padded_left(..., pad=-1)`: the newest token is always the last column (n-gram and bad-word
  matching look at the end of the sequence).
"""

from __future__ import annotations

from typing import Sequence

import torch

NEG_INF = float("-inf")


def host_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor, copied without waiting for the device (no sync)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def device_scalar(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-d tensor on `device`, filled there: no host -> device copy."""
    return torch.full((), value, dtype=dtype, device=device)


def padded_right(rows: Sequence[torch.Tensor | list[int]], pad: int,
                 device: torch.device) -> torch.Tensor:
    """Token rows (host int64 tensors or lists) as one device tensor `[len(rows), longest]`,
    padded at the end with `pad`."""
    return _padded(rows, pad, "right", device)


def padded_left(rows: Sequence[torch.Tensor | list[int]], pad: int, device: torch.device,
                width: int | None = None) -> torch.Tensor:
    """Token rows (host int64 tensors or lists) as one device tensor `[len(rows), width]`
    (default: the longest row), padded at the start with `pad`."""
    return _padded(rows, pad, "left", device, width)


def _padded(rows, pad: int, side: str, device: torch.device,
            width: int | None = None) -> torch.Tensor:
    if width is None:
        width = max(1, max(len(r) for r in rows))  # >= 1 column keeps shapes simple
    if all(isinstance(r, list) for r in rows):  # short lists: pad in Python, convert once
        fill = [[pad] * (width - len(r)) for r in rows]
        flat = [r + f if side == "right" else f + r for r, f in zip(rows, fill)]
        return host_to_device(flat, torch.long, device)
    batch = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(r, dtype=torch.long) for r in rows],
                                            batch_first=True, padding_value=pad,
                                            padding_side=side)  # [rows, longest]
    if batch.shape[1] < width:  # widen to the width asked for
        room = torch.full((len(rows), width - batch.shape[1]), pad, dtype=torch.long)
        batch = torch.cat([batch, room] if side == "right" else [room, batch], dim=1)
    return batch.to(device, non_blocking=True)


def token_presence(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[rows, vocab]` bool: which tokens occur in each row of `token_ids` (padded with vocab)."""
    seen = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.bool,
                       device=token_ids.device)  # [rows, vocab + 1]; the last column takes the padding
    seen.scatter_(1, token_ids, True)
    return seen[:, :vocab_size]


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[rows, vocab]` float: how often each token occurs in each row (padded with vocab)."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1,
                         device=token_ids.device)  # [rows, vocab + 1]
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=counts.dtype))
    return counts[:, :vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: torch.Tensor) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: the logit of every token already in the
    sequence (prompt and output) is divided by the penalty if positive, multiplied if negative.
    seen: [rows, vocab] bool; penalty: [rows] (1.0 = off)."""
    penalty = penalty[:, None]  # [rows, 1]
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)  # [rows, vocab]
    # A tiny penalty can overflow a logit to +inf, which softmax turns into NaN for the whole row:
    # the largest finite value still ranks it first.
    penalised = penalised.clamp(max=torch.finfo(logits.dtype).max)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, output_counts: torch.Tensor,
                             presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties over output tokens: logit -= frequency * count + presence * (count > 0).
    output_counts: [rows, vocab]; presence, frequency: [rows]."""
    return (logits - frequency[:, None] * output_counts
            - presence[:, None] * (output_counts > 0).to(logits.dtype))


def apply_no_repeat_ngram(logits: torch.Tensor, sequences: torch.Tensor,
                          ngram_size: int) -> torch.Tensor:
    """transformers' NoRepeatNGramLogitsProcessor: forbid every token that would complete an
    n-gram already present in the sequence (prompt and output).
    sequences: [rows, length] left-padded with -1 (a pad never equals a token, so windows that
    reach into the padding never match a real prefix)."""
    rows, vocab_size = logits.shape
    length = sequences.shape[1]
    if length < ngram_size:
        return logits
    windows = sequences.unfold(1, ngram_size, 1)  # [rows, length - n + 1, n]
    prefix = sequences[:, length - ngram_size + 1:]  # [rows, n - 1]: the newest n - 1 tokens
    matches = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1)  # [rows, length - n + 1]
    completing = windows[..., -1]  # [rows, length - n + 1]
    targets = torch.where(matches & (completing >= 0), completing, vocab_size)
    banned = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, targets, True)  # [rows, vocab + 1]
    return logits.masked_fill(banned[:, :vocab_size], NEG_INF)


def apply_bad_words(logits: torch.Tensor, sequence_tails: torch.Tensor, word_rows: torch.Tensor,
                    word_prefixes: torch.Tensor, word_last: torch.Tensor) -> torch.Tensor:
    """transformers' NoBadWordsLogitsProcessor: forbid the last token of a banned sequence when
    the sequence (prompt and output) ends with all of its other tokens; a one-token banned
    sequence is always forbidden.

    sequence_tails: [rows, T] newest tokens of each row, left-padded with -2;
    word_rows: [W] the row each banned sequence belongs to;
    word_prefixes: [W, T] each banned sequence without its last token, left-padded with -1
    (= "anything": a shorter prefix only has to match the newest tokens);
    word_last: [W] the token each banned sequence ends with."""
    rows, vocab_size = logits.shape
    tails = sequence_tails[word_rows]  # [W, T]
    matches = ((word_prefixes == tails) | (word_prefixes == -1)).all(dim=-1)  # [W]
    targets = torch.where(matches, word_last, vocab_size)  # [W]
    banned = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
    banned.index_put_((word_rows, targets), device_scalar(True, torch.bool, logits.device))
    return logits.masked_fill(banned[:, :vocab_size], NEG_INF)


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """OpenAI's logit_bias: add bias[i] to logits[rows[i], token_ids[i]]. All: [entries]."""
    return logits.index_put((rows, token_ids), bias, accumulate=True)


def apply_allowed_tokens(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor,
                         restricted_rows: torch.Tensor) -> torch.Tensor:
    """vLLM's allowed_token_ids: in each restricted row, every token not listed gets -inf.
    rows, token_ids: [entries] (row, allowed token) pairs; restricted_rows: [rows] bool."""
    disallowed = restricted_rows[:, None].expand_as(logits).clone()  # [rows, vocab]
    disallowed.index_put_((rows, token_ids), device_scalar(False, torch.bool, logits.device))
    return logits.masked_fill(disallowed, NEG_INF)


def apply_token_ban(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """-inf at (rows[i], token_ids[i]): transformers' MinLengthLogitsProcessor and
    MinNewTokensLengthLogitsProcessor, fed with the rows still short of their minimum and their
    EOS and stop token ids."""
    return logits.index_put((rows, token_ids), device_scalar(NEG_INF, logits.dtype, logits.device))


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """transformers' TemperatureLogitsWarper. temperature: [rows], > 0."""
    return logits / temperature[:, None]


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, k_max: int) -> torch.Tensor:
    """transformers' TopKLogitsWarper alone, through topk(k_max) rather than a full sort (much
    cheaper for a large vocabulary). top_k: [rows] int, >= vocab = off; k_max: the largest
    top_k below the vocabulary size in the batch."""
    top_values = logits.topk(k_max, dim=-1).values  # [rows, k_max], descending
    kth = top_values.gather(1, (top_k.clamp(1, k_max) - 1)[:, None])  # [rows, 1]
    kth = kth.masked_fill(top_k[:, None] >= logits.shape[1], NEG_INF)  # rows without top_k
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """transformers' TopKLogitsWarper then TopPLogitsWarper, sharing one sort.

    top_k: [rows] int (vocab = off): keep the tokens whose logit is >= the k-th largest (ties kept).
    top_p: [rows] (1.0 = off): drop the least likely tokens while their total mass <= 1 - top_p;
    the most likely token always stays."""
    vocab_size = logits.shape[1]
    # Stable: equal logits in token-id order, so the tokens top_p keeps of a tie group are the
    # same on every device (and in the candidates' fast path, candidates.py).
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [rows, vocab]
    if top_k is not None:
        kth_index = (top_k.clamp(1, vocab_size) - 1)[:, None]  # [rows, 1]
        kth = sorted_logits.gather(1, kth_index)  # [rows, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, NEG_INF)
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)  # [rows, vocab]
        # Mass of each token and all less likely ones, summed from the least likely up as
        # transformers does (ascending cumsum), so the float rounding matches.
        tail_mass = probs.flip(-1).cumsum(dim=-1).flip(-1)  # [rows, vocab]
        drop = tail_mass <= (1 - top_p)[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """transformers' MinPLogitsWarper: drop tokens with p < min_p * p_max. min_p: [rows] (0 = off)."""
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [rows, 1]
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_typical(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """transformers' TypicalLogitsWarper: keep the tokens whose information content is closest
    to the entropy until `mass` is covered. mass: [rows] in (0, 1); a row with mass 1.0 must
    not be passed (float rounding of the cumulative sum would drop tokens)."""
    log_probs = logits.log_softmax(dim=-1)  # [rows, vocab]
    entropy = -(log_probs * log_probs.exp()).nansum(dim=-1, keepdim=True)  # [rows, 1]
    distance = (-log_probs - entropy).abs()  # [rows, vocab]
    sorted_distance, order = distance.sort(dim=-1)  # [rows, vocab]
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)  # [rows, vocab]
    last_kept = (cumulative < mass[:, None]).sum(dim=1).clamp(max=logits.shape[1] - 1)  # [rows]
    drop = sorted_distance > sorted_distance.gather(1, last_kept[:, None])
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(1, order, drop), NEG_INF)


def apply_epsilon_cutoff(logits: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """transformers' EpsilonLogitsWarper: drop tokens with p < epsilon, keeping the most likely.
    epsilon: [rows] (0 = off)."""
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    drop = (probs < epsilon[:, None]) & (logits < logits.amax(dim=-1, keepdim=True))
    return logits.masked_fill(drop, NEG_INF)


def apply_eta_cutoff(logits: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """transformers' EtaLogitsWarper: drop tokens with p < min(eps, sqrt(eps) * exp(-entropy)),
    keeping the most likely. epsilon: [rows] (0 = off)."""
    log_probs = logits.log_softmax(dim=-1)  # [rows, vocab]
    probs = log_probs.exp()
    # torch.distributions.Categorical.entropy clamps -inf to the lowest float before multiplying.
    entropy = -(log_probs.clamp(min=torch.finfo(logits.dtype).min) * probs).sum(dim=-1)  # [rows]
    eta = torch.minimum(epsilon, epsilon.sqrt() * torch.exp(-entropy))[:, None]  # [rows, 1]
    drop = (probs < eta) & (logits < logits.amax(dim=-1, keepdim=True))
    return logits.masked_fill(drop, NEG_INF)
