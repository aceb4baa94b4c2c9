"""Batched sampler (first version: greedy and temperature)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list) -> SamplerOutput:
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # [num_reqs, vocab]
        greedy = torch.tensor([r.sampling_params.greedy for r in requests], device=logits.device)
        temps = torch.tensor([max(r.sampling_params.temperature, 1e-5) for r in requests],
                             device=logits.device, dtype=logits.dtype)
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        noise = torch.empty_like(probs)
        for i, r in enumerate(requests):
            noise[i].exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
        chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0]
        return SamplerOutput(tokens.tolist(), chosen.tolist(), None)


def prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, k: int):
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, target_ids[:, None])[:, 0].tolist()
    top = logp.topk(k, dim=-1) if k > 0 else None
    out = []
    for i, t in enumerate(target_ids.tolist()):
        d = {t: chosen[i]}
        if top is not None:
            for v, j in zip(top.values[i].tolist(), top.indices[i].tolist()):
                d.setdefault(j, v)
        out.append(d)
    return out
