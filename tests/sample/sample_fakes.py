"""A stand-in for the engine's Request with exactly the attributes the sampler reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ondo.sample import logits_processors as lp
from ondo.sampling_params import SamplingParams


@dataclass
class FakeRequest:
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    prompt_token_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    min_tokens: int = 0
    structured: object | None = None  # a GrammarState when the output is constrained

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


def request(prompt=(1, 2, 3), output=(), seed=None, eos=(), stop=(), bad_words=(), min_tokens=0,
            **params) -> FakeRequest:
    """A request with the given SamplingParams keywords; a seed gets its own generator."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return FakeRequest(SamplingParams(**params), list(prompt), list(output), generator,
                       frozenset(eos), frozenset(stop), [list(w) for w in bad_words], min_tokens)


def fused_and_rule_draws(logits: torch.Tensor, params: list, generators: list, seed: int):
    """(the fused candidates kernel's tokens, candidates.py's PyTorch rules' tokens) for `logits` with one
    SamplingParams a row, each drawn after seeding torch and every row generator with `seed`."""
    from ondo.sample.candidates import candidate_budget, draw_candidates, select_candidates
    from ondo.sample.candidates_triton import sample_candidates

    budgets = [candidate_budget(p, logits.shape[1]) for p in params]

    def seeded(draw):
        torch.manual_seed(seed)
        for generator in generators:
            if generator is not None:
                generator.manual_seed(seed)
        return draw()

    fused = seeded(lambda: sample_candidates(logits, params, budgets, generators))
    by_rules = seeded(lambda: draw_candidates(select_candidates(logits, params, budgets), generators))
    return fused, by_rules


def rebuilt_penalties(logits: torch.Tensor, reqs: list) -> torch.Tensor:
    """Penalties rebuilt from the token lists, as the processors' definitions say."""
    out = logits.clone()
    for i, r in enumerate(reqs):
        p = r.sampling_params
        history = torch.tensor(r.prompt_token_ids + r.output_token_ids, dtype=torch.long)
        seen = lp.token_presence(history[None], logits.shape[1])
        out[i:i + 1] = lp.apply_repetition_penalty(out[i:i + 1], seen, torch.tensor([p.repetition_penalty]))
        outputs = torch.tensor(r.output_token_ids or [logits.shape[1]], dtype=torch.long)
        counts = lp.token_counts(outputs[None], logits.shape[1])
        out[i:i + 1] = lp.apply_presence_frequency(out[i:i + 1], counts, torch.tensor([p.presence_penalty]),
                                                   torch.tensor([p.frequency_penalty]))
    return out
