"""The fused penalty kernel (ondo/sample/penalties_triton.py) under Triton's interpreter on the CPU:
driven by PenaltyState.slots over steps that append one token, several, replace or shorten an
output, and bring new requests into freed slots, it gives the penalties rebuilt from the token lists
and leaves the state the torch path builds. tests/sample/test_sampler_fast.py runs the same steps
through the Sampler on a GPU."""
from __future__ import annotations

from tests.triton_interpreter import assert_passes_in_triton_interpreter

_INTERPRETED = r"""
import gc, sys
import torch
sys.path.insert(0, "tests/sample")
from sample_fakes import rebuilt_penalties, request
from ondo.sample.penalties_triton import apply_penalties
from ondo.sample.penalty_state import PenaltyState

vocab = 4100   # three column blocks, the last one partial
state, by_rows = PenaltyState(), PenaltyState()
reqs = [request(prompt=[i, i + 1, 5], repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2)
        for i in range(18)]

def step(seed):
    logits = torch.randn(len(reqs), vocab, generator=torch.Generator().manual_seed(seed)) * 3
    values = torch.tensor([[1.4, 0.3, 0.2]] * len(reqs))
    got = apply_penalties(logits, state.slots(reqs, vocab, torch.device("cpu"), True, True), values)
    expected = rebuilt_penalties(logits, reqs)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), (got - expected).abs().max()
    rows = by_rows.rows(reqs, vocab, torch.device("cpu"), True, True)   # the torch path's state
    slots = [state._slots[id(r)].index for r in reqs]
    assert torch.equal(state._seen[slots], rows.seen) and torch.equal(state._counts[slots], rows.counts)
    for r, token in zip(reqs, got.argmax(dim=-1).tolist()):
        r.output_token_ids.append(token if seed % 2 else vocab - 1 - r.prompt_token_ids[0])

for seed in range(4):
    step(seed)
reqs[3].output_token_ids = [7, 7, 4099]   # replaced
reqs[4].output_token_ids.pop()            # a token not kept
reqs[6].output_token_ids += [3, 3]        # two at once
del reqs[10:14]
gc.collect()
reqs += [request(prompt=[9, 9], repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2)
         for _ in range(4)]
for seed in range(10, 13):
    step(seed)
print("ok")
"""


def test_fused_penalties_follow_the_token_lists():
    assert_passes_in_triton_interpreter(_INTERPRETED)
